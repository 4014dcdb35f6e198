"""Retrieval: chunking, the hybrid index, and answers that cite their sources."""
