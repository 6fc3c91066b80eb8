"""Helpers every layer uses: ``atomic.py`` (crash-safe writes into a user's directory, checked reads),
``pretrained.py`` (``save_pretrained`` without importing DeepSpeed), ``hub.py`` (a model named by a local directory
or a Hugging Face hub id)."""
