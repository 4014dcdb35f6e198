"""Measuring models: loss and bits per byte, exact match, BLEU and chrF, classification metrics."""
