"""Measuring models: loss and bits per byte, exact match, classification metrics."""
