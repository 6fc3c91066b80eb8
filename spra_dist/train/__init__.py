"""Training: YAML config -> model -> SpaRA -> engine -> step loop -> checkpoints -> adapter, metrics and plots.

    from spra_dist.train.config import load_config
    from spra_dist.train.recipe import train
    summary = train(load_config("configs/train/debug_tiny_llama.yaml", ["max_steps=5"]))

    schema.py      the schema (dataclasses, one docstring per field, Literal choices) and its validation
    config.py      load_config: a YAML file and key=value overrides; typed.py: pydantic's checks, our messages
    models.py      the offline base models: packaged checkpoints, a local directory, tiny random ones
    recipe.py      the one path that ties everything together, and the step loop
    loop.py        optimizer, schedule, one optimizer step through the engine
    eval.py        loss and accuracy / perplexity, greedy answers scored by exact match
    checkpoint.py  portable resume checkpoints (O(k), any engine and world size)
    guard.py       preemption signals and non-finite steps, agreed by every rank
    report.py      metrics.jsonl, loss.png, summary.json; trackers.py: TensorBoard, W&B
"""
