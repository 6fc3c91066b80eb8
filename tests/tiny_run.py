"""The debug tiny Llama as ``spra train`` leaves it, trained once per test session (the ``tiny_run`` fixture
of tests/conftest.py), and the settings it was trained with, for tests that check its outputs.

Logs, evals and checkpoints are set so that one run covers every test that reads a run directory: metrics
every ``LOG_EVERY`` steps, an eval at step 0, every ``EVAL_EVERY`` steps and at the end, a checkpoint at every
step, all of them kept.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "debug_tiny_llama.yaml"
STEPS = 6
LOG_EVERY = 2
EVAL_EVERY = 3
EVAL_SIZE = 32
# Overrides of CONFIG after the run's max_steps (a resume passes these with a larger max_steps).
SETTINGS = [f"log_every={LOG_EVERY}", f"eval_every={EVAL_EVERY}", f"eval_size={EVAL_SIZE}", "checkpoint_every=1",
            f"checkpoint_keep={STEPS}"]


def train_argv(out: Path, *, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    """``spra train`` arguments for the tiny run into ``out``: ``main(train_argv(out))``."""
    return ["train", "--config", str(CONFIG), f"output_dir={out}", f"max_steps={steps}", *SETTINGS, *extra]
