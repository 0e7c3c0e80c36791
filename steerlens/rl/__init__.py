"""RLOO training of steering vectors (and the LoRA / full-tuning baselines)."""
