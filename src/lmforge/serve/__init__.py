"""Serving a model over HTTP: the OpenAI-compatible API (app.py, generation.py, protocol.py)."""
