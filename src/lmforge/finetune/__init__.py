"""Fine-tuning: classification and instruction following, full or with LoRA."""
