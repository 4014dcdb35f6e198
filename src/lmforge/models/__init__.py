"""Tokens to logits: the model config, the one transformer, its fused loss, LoRA, sizing."""
