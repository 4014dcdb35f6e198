"""Foundations every stage uses: errors, atomic files, safetensors reading, devices and DDP, configs."""
