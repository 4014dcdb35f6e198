"""Using a model: sampling, the generation loop, chat, embeddings, classification."""
