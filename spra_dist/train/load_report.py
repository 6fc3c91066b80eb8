"""What loading a base says: one line of ours for the expected, transformers' report for the rest.

    model = from_pretrained(AutoModelForSequenceClassification, path, dtype=torch.float32, num_labels=2)
    # classifier head newly initialised (the base has none): classifier.weight, classifier.bias

A classifier built on a base checkpoint has a task head the checkpoint lacks; transformers then prints a
``LOAD REPORT`` table with those keys marked ``MISSING``, which reads like a failure. That case is expected,
so it becomes one line; so is the base's own head that the classifier drops (a causal LM's ``lm_head``).
Anything else (a weight of the base model missing or unused, a size mismatch, a failed conversion) still
prints transformers' full report.
"""

from __future__ import annotations

import logging

from torch import nn

from spra_dist.distributed.group import launched_rank

REPORTER = "transformers.modeling_utils"  # the logger that writes the LOAD REPORT


def from_pretrained(auto, source: str, **kwargs) -> nn.Module:
    """``auto.from_pretrained(source, **kwargs)``, its load report held back and shown only if unexpected."""
    held = _HoldReport()
    log = logging.getLogger(REPORTER)
    log.addFilter(held)
    try:
        model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    except BaseException:
        held.release(log)  # the error says "look at the above report"
        raise
    finally:
        log.removeFilter(held)
    head, other = split_missing(model, info["missing_keys"])
    odd = [k for k in info["unexpected_keys"] if not _in_head(model, k)]  # not the base's own head (lm_head)
    if head and not other and not odd and not info["mismatched_keys"]:
        say_new_head(model, head)
    else:
        held.release(log)  # nothing held when transformers had nothing to say
    return model


def split_missing(model: nn.Module, missing) -> tuple[list[str], list[str]]:
    """(head, other): the keys a base lacks that belong to a task head outside the base model (expected for a
    classifier on a base checkpoint), and the rest; each in the model's own order."""
    order = {k: i for i, k in enumerate(model.state_dict())}
    keys = sorted(missing, key=lambda k: (order.get(k, len(order)), k))
    return [k for k in keys if _in_head(model, k)], [k for k in keys if not _in_head(model, k)]


def _in_head(model: nn.Module, key: str) -> bool:
    """Whether ``key`` lies outside the base model that a task model wraps (``bert.``, ``model.``)."""
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and hasattr(model, prefix) and not key.startswith(f"{prefix}.")


def say_new_head(model: nn.Module, keys: list[str]) -> None:
    """One line on rank 0: ``classifier head newly initialised (the base has none): classifier.weight, ...``."""
    if not keys or launched_rank() != 0:
        return
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))
    print(f"{', '.join(modules)} head newly initialised (the base has none): {', '.join(keys)}", flush=True)


class _HoldReport(logging.Filter):
    """Keeps transformers' LOAD REPORT back; ``release`` logs it after all."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def release(self, log: logging.Logger) -> None:
        log.removeFilter(self)
        for record in self.records:
            log.handle(record)
        self.records.clear()
