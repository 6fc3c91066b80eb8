"""SpaRA under TRL's ``GRPOTrainer`` with vLLM rollouts: vLLM gets the merged weights ``W + Δ``.

    from trl import GRPOConfig
    from spra_dist.integrations.hf import SpraAdapterCallback
    from spra_dist.integrations.trl import SpraGRPOTrainer

    model = apply_spra(model, SpraConfig(lora_rank=8, seed=1234))
    trainer = SpraGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(use_vllm=True, ...),
                              train_dataset=prompts, callbacks=[SpraAdapterCallback()])
    trainer.train()

``SpraGRPOTrainer`` takes ``GRPOTrainer``'s arguments unchanged. With ``use_vllm=True`` and a SpaRA model, each
weight sync pushes ``merged_named_parameters(model)``: every tensor under the plain model's name, ``W + Δ`` for
the adapted weights (built one matrix at a time, added in fp32 and rounded once, as ``merge_adapter`` writes), the
``spra_values`` left out. Without vLLM, or for a model without SpaRA, it is ``GRPOTrainer``.

Why a subclass, and what it overrides (TRL 1.16). The trainer pushes weights in ``VLLMGeneration.sync_weights``
(``trl/generation/vllm_generation.py``), in both vLLM modes: ``server`` streams them with
``VLLMClient.update_named_params(metadata, tensors)``, ``colocate`` hands each to the engine's
``model.load_weights([(name, tensor)])``. Both read the tensors from ``VLLMGeneration._iter_named_params``, which
for a model that is not PEFT walks ``model.named_parameters()``: for a SpaRA model, the frozen base weights plus
``...spra_values`` tensors vLLM has no parameter for. No callback or argument chooses those tensors, so this
trainer gives its ``VLLMGeneration`` one overridden method, ``_iter_named_params`` (TRL's own sync code runs
unchanged around it). The method is private: ``tests/test_weight_sync.py`` drives TRL's ``sync_weights`` against
stand-in vLLM clients, so a TRL release that moves it fails there, and this trainer refuses to start if it is gone.

A plain ``GRPOTrainer(use_vllm=True)`` with a SpaRA model is refused by ``SpraAdapterCallback`` before training
starts, rather than training on rollouts that never see the adapter.

Each sync sends the whole model, as TRL does for any model. The O(k) sync (``spra_dist.distributed.sync``) needs a
receiver inside the vLLM workers, which TRL's client does not provide.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from trl import GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration

from spra_dist.adapters.merge import merged_named_parameters
from spra_dist.core.registry import spra_config
from spra_dist.distributed.tensors import unwrap
from spra_dist.integrations.hf import SpraAdapterCallback

_OVERRIDDEN = "_iter_named_params"


class MergedWeightsVLLMGeneration(VLLMGeneration):
    """TRL's vLLM backend, pushing a SpaRA model's merged weights on each sync (see the module docstring)."""

    def _iter_named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Every rank iterates: under FSDP2 / ZeRO-3 each tensor is gathered whole, a collective.
        for name, tensor in merged_named_parameters(self.model):
            yield self._fix_param_name_to_vllm(name), tensor


def push_merged_weights(generation: VLLMGeneration) -> VLLMGeneration:
    """Make a ``VLLMGeneration`` TRL has built push merged weights from now on (its vLLM engine or client is kept)
    and return it. ``GRPOTrainer`` builds it while it starts vLLM, so a subclass cannot be passed in instead."""
    if not callable(getattr(VLLMGeneration, _OVERRIDDEN, None)):
        import trl

        raise ValueError(f"trl {trl.__version__}'s VLLMGeneration has no {_OVERRIDDEN}, the method SpaRA overrides "
                         f"to send vLLM merged weights: use trl 1.16, or use_vllm=False")
    if not isinstance(generation, VLLMGeneration):
        raise ValueError(f"expected TRL's VLLMGeneration, got {type(generation).__name__}")
    generation.__class__ = MergedWeightsVLLMGeneration  # adds one method, no state: the object stays TRL's
    return generation


class SpraGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose vLLM weight syncs send a SpaRA model's ``W + Δ`` (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._merged = self.use_vllm and spra_config(unwrap(self.model)) is not None
        if self._merged:
            push_merged_weights(self.vllm_generation)
            for callback in self.callback_handler.callbacks:
                self._tell(callback)

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        for added in self.callback_handler.callbacks:
            self._tell(added)

    def _tell(self, callback) -> None:
        """Let SpraAdapterCallback's vLLM guard know that this trainer sends merged weights."""
        if getattr(self, "_merged", False) and isinstance(callback, SpraAdapterCallback):
            callback.vllm_gets_merged_weights = True
