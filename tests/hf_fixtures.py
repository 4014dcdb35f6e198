"""Tiny randomly initialised Hugging Face models and tokenizers, saved the way the Hub ships them."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import make_docs
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.text.tokenizer import SPLIT_PATTERN

VOCAB = 320  # embedding rows; the tokenizers below have a few less (padding, as real models do)

SAMPLE_TEXTS = [
    "Hello, world! The quick brown fox.",
    "   leading spaces, trailing spaces   ",
    "multiple     spaces\tand\ttabs\n\n\nand newlines\r\n",
    "déjà vu, naïve café, Größe, ñandú",
    "Привет мир, 你好世界, こんにちは, مرحبا, नमस्ते",
    "emoji: 😀🎉👍🏽 and 🇫🇷 flags",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "numbers 1234567 3.14159 -42 1e-9",
    "<|endoftext|> inside text and <|im_start|>user",
    "",
]


def _train(tok: HFTokenizer, specials: list[str], size: int = 300) -> HFTokenizer:
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
                                  if isinstance(tok.decoder, decoders.ByteLevel) else [])
    tok.train_from_iterator(make_docs(80) + SAMPLE_TEXTS, trainer=trainer)
    return tok


def gpt2_style() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _train(tok, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def llama3_style() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    pattern = SPLIT_PATTERN  # Llama 3 uses GPT-4's split, as lmforge's own tokenizer does
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok = _train(tok, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return tok


def qwen_style() -> HFTokenizer:
    """Qwen2/3 layout: NFC normalisation and single-digit numbers (what transformers' Qwen2Tokenizer
    rebuilds regardless of tokenizer.json, so the test tokenizer must agree with it)."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    pattern = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return _train(tok, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def sentencepiece_style() -> HFTokenizer:
    """Llama 2 / Mistral layout: '▁' for spaces, byte fallback, a BOS added by the post-processor."""
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300 + 256, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  show_progress=False)
    tok.train_from_iterator(make_docs(80) + SAMPLE_TEXTS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def save_tokenizer(tok: HFTokenizer, directory: Path, bos: str, eos: str, chat_template: str | None = None):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)


def tiny_hf_model(family: str, directory: Path, *, vocab: int | None = None, shard: str | None = None,
                  dtype: torch.dtype = torch.float32, **overrides):
    """Save a tiny random `family` model plus a matching tokenizer; returns the model (eval mode).

    The embedding has a few more rows than the tokenizer has tokens, as real checkpoints do.
    """
    import transformers as tf

    if family == "gpt2":
        tok, bos, eos = gpt2_style(), "<|endoftext|>", "<|endoftext|>"
    elif family == "llama":
        tok, bos, eos = llama3_style(), "<|begin_of_text|>", "<|end_of_text|>"
    elif family in ("qwen2", "qwen3"):
        tok, bos, eos = qwen_style(), "<|endoftext|>", "<|endoftext|>"
    else:
        tok, bos, eos = sentencepiece_style(), "<s>", "</s>"
    vocab = vocab or 64 * (tok.get_vocab_size() // 64 + 1)
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos))
    if family == "gpt2":
        cfg = tf.GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common, **overrides)
        model_cls = tf.GPT2LMHeadModel
    else:
        llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
        cls_cfg, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                              "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                              "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                              "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[family]
        if family == "mistral":
            llama_like.update(head_dim=16, sliding_window=24)  # a window shorter than the test sequences
        if family == "qwen3":
            llama_like["head_dim"] = 24  # Qwen3 decouples head_dim from hidden_size / heads
        cfg = cls_cfg(**{**llama_like, **overrides})
    model = model_cls(cfg).to(dtype).eval()
    with torch.no_grad():  # random biases and norm gains, so every parameter matters in the comparison
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, max_shard_size=shard) if shard else model.save_pretrained(directory)
    save_tokenizer(tok, directory, bos, eos)
    return model


def wordpiece_style() -> HFTokenizer:
    """A BERT WordPiece tokenizer ([CLS] text [SEP], lowercase), trained on the sample texts."""
    from tokenizers.implementations import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(make_docs(80) + SAMPLE_TEXTS, vocab_size=300, show_progress=False)
    return wp._tokenizer


def tiny_bert(directory: Path, masked_lm: bool = True):
    """A tiny random BERT (BertForMaskedLM, or the bare BertModel) with its WordPiece tokenizer."""
    import transformers as tf

    tok = wordpiece_style()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64 * (tok.get_vocab_size() // 64 + 1), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = (tf.BertForMaskedLM if masked_lm else tf.BertModel)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tf.BertTokenizerFast(tokenizer_object=tok).save_pretrained(directory)
    return model


def t5_style() -> HFTokenizer:
    """T5's SentencePiece-derived layout: a Unigram model, '▁' for spaces, "</s>" appended, and
    <extra_id_N> sentinels at the end of the vocabulary. The pieces are counted, not trained
    (Unigram training is not deterministic): every character, and the commonest words whole."""
    from collections import Counter

    texts = make_docs(80) + SAMPLE_TEXTS
    words = Counter(w for t in texts for w in ("▁" + t.replace(" ", " ▁")).split(" ") if len(w) > 1)
    chars = sorted({c for t in texts for c in t.replace(" ", "▁")} | {"▁"})
    common = sorted(words, key=lambda w: (-words[w], w))[:150]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -5.0) for w in common]
    pieces += [(c, -10.0) for c in chars if c not in common]
    tok = HFTokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(8)])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def bart_style() -> HFTokenizer:
    """BART's (RoBERTa's) byte-level BPE with <s> text </s> around each input."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok = _train(tok, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=False)
    return tok


def tiny_seq2seq(family: str, directory: Path, **overrides):
    """Save a tiny random T5ForConditionalGeneration or BartForConditionalGeneration with a matching
    tokenizer; returns the model (eval mode). T5 overrides: feed_forward_proj="gated-gelu" and
    tie_word_embeddings=False make a v1.1 / FLAN-T5 (its own output layer, no output scale)."""
    import transformers as tf
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    if family == "t5":
        tok = t5_style()
        untied = overrides.get("tie_word_embeddings") is False
        cfg = tf.T5Config(**{**dict(vocab_size=64 * (tok.get_vocab_size() // 64 + 1), d_model=32, d_kv=8, d_ff=48,
                                    num_layers=2, num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                                    relative_attention_max_distance=20, dropout_rate=0.0, pad_token_id=0,
                                    eos_token_id=1, decoder_start_token_id=0), **overrides})
        model = tf.T5ForConditionalGeneration(cfg)
        if untied:  # transformers 5 ties T5's output layer at init; v1.1 checkpoints carry their own
            model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn_like(model.lm_head.weight))
        with torch.no_grad():  # wider than T5's init, so that greedy decoding does not repeat one token
            for name, p in model.named_parameters():
                if p.dim() == 2 and "shared" not in name and "lm_head" not in name:
                    p.normal_(0, 0.5)
        specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    else:
        tok = bart_style()
        cfg = tf.BartConfig(**{**dict(vocab_size=64 * (tok.get_vocab_size() // 64 + 1), d_model=32, encoder_layers=2,
                                      decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                                      encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                                      dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                      decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.2),
                                 **overrides})
        model = tf.BartForConditionalGeneration(cfg)
        specials = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    model.eval()
    with torch.no_grad():  # random biases and norm gains, so every parameter matters in the comparison
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(directory)
    return model
