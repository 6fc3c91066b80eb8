"""SpraConfig: which matrices get a sparse random delta, how many entries each trains, and the mask seed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class SpraConfig:
    target_modules: str | list[str] = "all-linear"
    """``"all-linear"`` (every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head), or a list of
    module-name suffixes (``"q_proj"``, ``"attention.self.query"``) or regular expressions matched against the
    whole module name."""

    lora_rank: int | None = 8
    """Budget matched to LoRA of this rank: ``k = r * (n_in + n_out)`` per matrix, capped at its size."""

    density: float | None = None
    """Budget as a fraction of each matrix: ``k = round(density * numel)``. Set exactly one of the two."""

    seed: int | None = None
    """Mask seed. ``None``: drawn once at ``apply_spra`` (and agreed across ranks when distributed)."""

    trainable_modules: list[str] = field(default_factory=list)
    """Modules trained densely (a task head such as ``classifier``); never also adapted."""

    value_dtype: str = "float32"
    """dtype of the trained values: ``float32`` (at least fp32, whatever the weight's dtype: Adam's small updates
    survive on a bf16 / fp16 base, as PEFT keeps adapters in fp32) or ``auto`` (the weight's own dtype)."""

    mask_residency: str = "host"
    """Where each layer keeps its mask (4 bytes a value; the one state that sharding cannot divide): ``host``
    (host memory; each op copies the one matrix's mask it needs to the device, so a GPU holds one layer's mask
    at a time) or ``device`` (on the weight's device: no copy per use, the whole model's mask on every GPU).
    The same on a CPU; the adapter does not depend on it."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad value and the fix."""
        if (self.lora_rank is None) == (self.density is None):
            raise ValueError(
                f"set exactly one of lora_rank and density (got lora_rank={self.lora_rank}, "
                f"density={self.density}); e.g. lora_rank=8 or density=0.01 with the other null"
            )
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or int(self.lora_rank) != self.lora_rank
                                           or self.lora_rank <= 0):
            raise ValueError(f"lora_rank must be a positive integer, got {self.lora_rank!r}; e.g. lora_rank=8")
        if self.density is not None and not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}; e.g. density=0.01 for 1%")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise ValueError(
                    f"target_modules={self.target_modules!r}: give 'all-linear' or a list of module-name "
                    f"suffixes / regexes, e.g. ['q_proj', 'v_proj']"
                )
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if isinstance(self.trainable_modules, str):
            raise ValueError(
                f"trainable_modules must be a list, got the string {self.trainable_modules!r}; "
                f"write [{self.trainable_modules!r}]"
            )
        if self.value_dtype not in ("float32", "auto"):
            raise ValueError(f"value_dtype={self.value_dtype!r}: use float32 (fp32 master values, the default) or "
                             f"auto (the weight's dtype)")
        if self.mask_residency not in ("host", "device"):
            raise ValueError(f"mask_residency={self.mask_residency!r}: use host (masks in host memory, one layer's "
                             f"on the GPU at a time; the default) or device (every mask on the GPU)")
        if self.seed is not None and (isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or null, got {self.seed!r}")

    def values_dtype_for(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the values of a weight of ``weight_dtype``."""
        if self.value_dtype == "auto":
            return weight_dtype
        return torch.promote_types(weight_dtype, torch.float32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def adapter_dict(self) -> dict:
        """The settings that decide the adapter: what an adapter file records and what ranks must share
        (where a rank keeps its masks is its own business)."""
        return {k: v for k, v in self.to_dict().items() if k != "mask_residency"}

    @classmethod
    def from_dict(cls, d: dict) -> SpraConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
