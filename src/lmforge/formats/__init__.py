"""Models on disk: the lmforge model directory, model kinds, Hugging Face checkpoints, loading."""
