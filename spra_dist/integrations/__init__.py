"""The loops users already have: ``hf.py`` (HF Trainer and TRL: adapter-only checkpoints, DeepSpeed presets) and
``trl.py`` (TRL's GRPOTrainer with vLLM rollouts: the merged weights on each sync)."""
