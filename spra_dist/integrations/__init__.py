"""The loops users already have: ``hf.py`` (HF Trainer and TRL: adapter-only checkpoints, DeepSpeed presets)."""
