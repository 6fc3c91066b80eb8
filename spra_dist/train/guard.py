"""Step guard: preemption signals and non-finite steps, decided the same way on every rank.

Once per optimizer step, after the gradients exist and before the optimizer applies them, every rank
all-reduces two flags (MAX): "this rank saw a non-finite loss or gradient norm" and "this rank received
SIGTERM / SIGINT / SIGUSR1". A signal delivered to one rank (or a NaN on one rank) therefore changes what
every rank does at the same step, and no rank is left waiting in a collective the others skipped.

- Preemption: the step in flight finishes, the recipe writes one portable checkpoint and raises
  :class:`Preempted` (exit status ``EXIT_PREEMPTED``); ``resume=auto`` continues from it.
- Non-finite (``on_nonfinite``): ``skip`` drops the step on every rank (gradients discarded, no optimizer
  update) and counts it; ``max_nonfinite_skips`` skips in a row end the run as ``stop`` does. ``stop`` keeps the
  last good state, writes it as a checkpoint and raises :class:`NonFiniteError` (``EXIT_NONFINITE``).
"""

from __future__ import annotations

import math
import signal
import threading

import torch
import torch.distributed as dist

from spra_dist.distributed.devices import collective_device
from spra_dist.distributed.group import world

EXIT_PREEMPTED = 75
"""Exit status after a preemption signal: a checkpoint was written; rerun with resume=auto (EX_TEMPFAIL)."""

EXIT_NONFINITE = 3
"""Exit status when non-finite loss or gradients stop the run; the last good state was written."""

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(RuntimeError):
    """A preemption signal ended the run after a checkpoint at ``step``."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteError(RuntimeError):
    """Non-finite loss or gradients ended the run (on_nonfinite=stop, or too many skips in a row)."""

    exit_code = EXIT_NONFINITE


class StepGuard:
    """Catches the preemption signals for the duration of a run and makes the per-step decision."""

    def __init__(self, *, on_nonfinite: str = "stop", max_skips: int = 10) -> None:
        self.on_nonfinite, self.max_skips = on_nonfinite, max_skips
        self.signal_name: str | None = None
        self.skipped = 0
        """Steps dropped for non-finite values, in total."""
        self.skipped_in_a_row = 0
        self.preempt = False
        """Set once all ranks agreed to stop for a signal (at the end of the current step)."""
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------------ signals
    def __enter__(self) -> StepGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        # Only note it: the step in flight (and any collective in it) must finish on every rank.
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    # ------------------------------------------------------------------ the per-step decision
    def decide(self, *, losses: list[float], grad_norm: float | None) -> bool:
        """One all-reduce of (non-finite here, signal here) → whether this step's update may be applied.

        Call on every rank once per step, after backward and before the optimizer step.
        """
        bad = not all(math.isfinite(x) for x in losses) or (grad_norm is not None and not math.isfinite(grad_norm))
        flags = torch.tensor([float(bad), float(self.signal_name is not None)], device=collective_device())
        if world()[1] > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, signalled = bool(flags[0]), bool(flags[1])
        self.preempt = self.preempt or signalled
        if not nonfinite:
            self.skipped_in_a_row = 0
            return True
        self.skipped += 1
        self.skipped_in_a_row += 1
        return False

    def check_nonfinite(self, step: int) -> None:
        """After a dropped step: raise :class:`NonFiniteError` when the policy says the run must end."""
        if self.on_nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradients at step {step} on at least one rank; the update was not applied "
                f"and the last good state was saved. Lower lr, set max_grad_norm, check the data, or set "
                f"on_nonfinite=skip to drop such steps")
        if self.skipped_in_a_row >= self.max_skips:
            raise NonFiniteError(
                f"{self.skipped_in_a_row} steps in a row had non-finite loss or gradients (up to step {step}); "
                f"max_nonfinite_skips={self.max_skips} reached, the last good state was saved. Lower lr, set "
                f"max_grad_norm or check the data")

    def preempted_message(self, step: int, checkpoint) -> str:
        """The one line a preempted run ends with (not an error: the run is saved and continues on a rerun)."""
        what = self.signal_name or "a signal on another rank"
        return f"stopped at step {step} ({what}); checkpoint {checkpoint}; rerun with resume=auto"
