"""SpaRA under TRL's ``GRPOTrainer`` and ``DPOTrainer``: the reference model is the policy with its adapter
bypassed (no copy), and vLLM rollouts get the merged weights ``W + Δ``.

    from trl import GRPOConfig
    from spra_dist.integrations.hf import SpraAdapterCallback
    from spra_dist.integrations.trl import SpraDPOTrainer, SpraGRPOTrainer

    model = apply_spra(model, SpraConfig(lora_rank=8, seed=1234))
    trainer = SpraGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(beta=0.04, use_vllm=True, ...),
                              train_dataset=prompts, callbacks=[SpraAdapterCallback()])
    trainer.train()
    # DPO: SpraDPOTrainer(model=model, args=DPOConfig(...), train_dataset=pairs, callbacks=[SpraAdapterCallback()])

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

The reference model (GRPO's KL term, DPO's log-ratios). For a PEFT model TRL takes the reference by disabling the
adapter; for any other model it loads a second copy from ``model.config._name_or_path``: a SpaRA model would double
its memory. ``SpraGRPOTrainer`` and ``SpraDPOTrainer`` give TRL a :class:`BaseReference` instead: the policy itself,
run under ``torch.no_grad()`` with its adapter bypassed (``bypass_adapter``: each SpaRA module skips its values for
the call; nothing is copied, switched or rebuilt). It is the base the adapter started from, bit for bit.

- ``SpraGRPOTrainer``: GRPO takes no reference argument, so TRL's ``__init__`` runs with ``beta = 0`` (it then builds
  no reference) and the trainer sets ``beta`` back and installs the reference afterwards; TRL calls it where it
  would call its own copy.
- ``SpraDPOTrainer``: passed as DPO's ``ref_model`` argument; with ``precompute_ref_log_probs=True`` TRL scores the
  dataset with it before training and it stays for ``evaluate`` datasets. Runs under no engine and DDP (TRL wraps a
  given ``ref_model`` in its own DeepSpeed or FSDP engine, which a model holding no weights cannot take: refused).

Passing ``ref_model=`` yourself (DPO) keeps TRL's behaviour. ``sync_ref_model`` is refused, as TRL refuses it for
PEFT: the reference is the base, and nothing holds a copy to sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from trl import DPOTrainer, GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration

from spra_dist.adapters.merge import merged_named_parameters
from spra_dist.adapters.named import bypass_adapter
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


class BaseReference(nn.Module):
    """TRL's reference model for a SpaRA policy: the policy itself, its adapter bypassed, under ``no_grad``. It
    holds no weights; ``policy`` returns the trainer's model at call time (the Trainer may re-wrap it)."""

    def __init__(self, policy: Callable[[], nn.Module]) -> None:
        super().__init__()
        self._policy = policy

    @property
    def config(self):
        return unwrap(self._policy()).config

    @property
    def base_model(self) -> nn.Module:  # what TRL's fused log-prob head runs (add_fused_lm_head)
        return unwrap(self._policy()).base_model

    def get_output_embeddings(self) -> nn.Module:
        return unwrap(self._policy()).get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self._policy()(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), bypass_adapter(self._policy()):
            return super().__call__(*args, **kwargs)


def _is_spra(model) -> bool:
    return isinstance(model, nn.Module) and spra_config(unwrap(model)) is not None


def _refuse_sync_ref_model(args) -> None:
    if getattr(args, "sync_ref_model", False):
        raise ValueError("sync_ref_model=True with a SpaRA model: its reference is the base model (the adapter "
                         "bypassed), and no copy is kept to sync; set sync_ref_model=False")


class SpraGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose reference model is the SpaRA policy with its adapter bypassed, and whose vLLM weight
    syncs send ``W + Δ`` (see the module docstring)."""

    def __init__(self, model, *args, **kwargs) -> None:
        spra = _is_spra(model)
        config = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        beta = getattr(config, "beta", 0.0)
        if spra and beta:
            _refuse_sync_ref_model(config)
            config.beta = 0.0  # TRL builds no reference copy at beta 0 (GRPOTrainer.__init__)
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if spra and beta:
                config.beta = beta
        if spra and beta:
            self.beta = beta
            self.ref_model = BaseReference(lambda: self.model)
        self._merged = self.use_vllm and spra
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


class SpraDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose reference model is the SpaRA policy with its adapter bypassed (see the module
    docstring); with ``ref_model=`` given, or a model without SpaRA, it is ``DPOTrainer``."""

    def __init__(self, model, ref_model=None, *args, **kwargs) -> None:
        config = kwargs.get("args") if "args" in kwargs else (args[0] if args else None)
        reference = ref_model is None and _is_spra(model)
        if reference:
            _refuse_sync_ref_model(config)
            state = getattr(config, "distributed_state", None)
            kind = str(getattr(state, "distributed_type", "NO")).rsplit(".", 1)[-1]
            if kind in ("DEEPSPEED", "FSDP"):
                raise ValueError(f"SpraDPOTrainer's reference (the policy with its adapter bypassed) runs under no "
                                 f"engine and DDP, not {kind}: TRL would wrap it in an engine of its own; launch with "
                                 f"accelerate's multi-GPU (DDP) config, or pass ref_model= yourself")
            if not getattr(config, "precompute_ref_log_probs", False):
                ref_model = BaseReference(lambda: self.model)
        super().__init__(model, ref_model, *args, **kwargs)
        if reference and self.ref_model is None:  # precomputed at init (scored by the policy, bypassed here)
            self.ref_model = BaseReference(lambda: self.model)

    def compute_ref_log_probs(self, model, inputs):
        if self.ref_model is None and _is_spra(self.model):  # __init__'s precompute, before the reference is set
            with bypass_adapter(self.model):
                return super().compute_ref_log_probs(model, inputs)
        return super().compute_ref_log_probs(model, inputs)
