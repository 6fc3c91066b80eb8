"""Training: YAML config -> model -> SpaRA -> train loop -> adapter, metrics and plots.

    from spra_dist.train.config import load_config
    from spra_dist.train.recipe import train
    summary = train(load_config("configs/train/debug_tiny_llama.yaml", ["max_steps=5"]))

Modules: ``config`` (dataclasses + overrides), ``models`` (offline base models), ``data`` (token sets and
batch order), ``loop`` (optimizer, schedule, train step, eval), ``report`` (metrics, plot, summary) and
``recipe`` (the one path that ties them together).
"""
