"""Training data: cached token streams, JSONL records (labelled, instruction, chat), batching."""
