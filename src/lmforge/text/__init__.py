"""Raw text to tokens: corpora, the BPE tokenizer, chat templates."""
