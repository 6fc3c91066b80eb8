"""Sparse weight sync to rollout processes: after each optimizer step the trainer sends only the k values of each
adapted matrix; each rollout process, holding the plain base model, writes ``W[idx] = W_base[idx] + v`` in place.

    # the trainer (global rank src) and the rollout ranks share `group`; gloo on CPUs, nccl on GPUs
    sender = WeightSender(model, group=group, src=0)          # trainer: the SpaRA model, under any engine
    sender.handshake()                                        # once: the config out, the fingerprints compared
    for batch in data:
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        sender.send()                                         # one broadcast of k values per sync

    receiver = WeightReceiver(base, group=group, src=0)       # rollout rank: a plain HF model with the base weights
    receiver.handshake()                                      # builds the masks itself from the seed
    while True:
        receiver.receive()                                    # W[idx] = originals + v, O(k)
        <generate with base>

What goes over the wire. Once, at the handshake: the adapter's settings (seed, spra config, per-matrix key, shape
and k, mask_version), each rollout's weight dtype, and one 64-bit mask fingerprint per rank (as
``spra_dist.distributed.agreement`` compares them between training ranks). A rollout whose masks would differ —
another seed, budget or target list, another base shape — makes every rank raise the same ``ValueError`` naming
the first differing key; no rank is left waiting in a collective. Per sync: one flat buffer, the k values of every
adapted matrix (sorted by key) followed by any densely trained parameter (``trainable_modules``), cast to the
rollout's dtype: ``k_total × dtype size`` bytes and nothing else, against the whole model for a dense sync.

The receiver keeps its own copy of the k original entries per matrix and writes ``originals + v`` each time
(added in fp32, rounded once to the weight's dtype, as ``spra_dist.core.kernels.merged_entries`` does): no drift
over many syncs, and ``restore()`` puts the base back exactly. Indices never cross the wire.

Under FSDP2 (or ZeRO-3) the values are sharded over the training ranks: every training rank builds a
``WeightSender`` and calls ``send()`` (each value tensor is gathered whole, ``full_tensor``), and only ``src`` —
the one training rank in ``group`` — broadcasts. Rollout engines that take whole tensors (vLLM's
``load_weights``) are served by ``spra_dist.adapters.merge.merged_named_parameters`` instead.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from spra_dist.core.config import SpraConfig
from spra_dist.core.kernels import merged_entries, put
from spra_dist.core.layer import build_masks
from spra_dist.core.masks import MASK_VERSION, budget
from spra_dist.core.model import dense_parameter_names, select_targets, spra_modules
from spra_dist.core.registry import spra_config
from spra_dist.distributed.agreement import compare_masks
from spra_dist.distributed.devices import collective_device
from spra_dist.distributed.tensors import full_tensor, global_shape, unwrap


@dataclasses.dataclass(frozen=True)
class SyncLayout:
    """What one sync carries, in order: the ``k`` values of each adapted matrix (sorted by key), then each densely
    trained parameter whole, all in ``dtype``."""

    layers: tuple[tuple[str, tuple[int, ...], int], ...]
    """``(key, weight shape, k)`` per adapted matrix; ``key`` is the weight's name, ``...q_proj.weight``."""
    dense: tuple[tuple[str, tuple[int, ...]], ...]
    """``(name, shape)`` per densely trained parameter."""
    dtype: torch.dtype

    @property
    def k_total(self) -> int:
        return sum(k for _, _, k in self.layers)

    @property
    def numel(self) -> int:
        return self.k_total + sum(_numel(shape) for _, shape in self.dense)

    @property
    def nbytes(self) -> int:
        """Bytes per sync."""
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()


def sync_settings(cfg: SpraConfig) -> dict:
    """The settings that decide the masks (and so must agree between trainer and rollout): the adapter's, less the
    values' dtype, which is the trainer's own business."""
    return {k: v for k, v in cfg.adapter_dict().items() if k != "value_dtype"}


class WeightSender:
    """The trainer's side: sends the adapter's values to the rollout ranks of ``group`` by a broadcast from ``src``.

    ``model``: the SpaRA model (plain, DDP, FSDP2 or DeepSpeed-wrapped). ``group``: the trainer's rank ``src``
    (global rank) and the rollout ranks (default: the world). ``dtype``: the values' dtype on the wire (default:
    the rollout's weight dtype, which the rollout ranks report at the handshake). Under FSDP2 / ZeRO-3, build one on
    every training rank and call ``send()`` on each; only ``src`` may be a member of ``group``.
    """

    def __init__(self, model: nn.Module, *, group: dist.ProcessGroup | None = None, src: int = 0,
                 dtype: torch.dtype | None = None) -> None:
        self.model, self.group, self.src, self.dtype = unwrap(model), group, int(src), dtype
        _require_group()
        self.is_src = dist.get_rank() == self.src
        if not self.is_src and dist.get_rank(group) >= 0:
            raise ValueError(f"rank {dist.get_rank()} is a training rank in the sync group, whose one trainer is "
                             f"src={self.src}: give WeightSender a group of rank {self.src} and the rollout ranks "
                             f"(dist.new_group([{self.src}, *rollout_ranks]))")
        self.layout: SyncLayout | None = None
        self._buffer: torch.Tensor | None = None

    def _tensors(self) -> list[tuple[str, nn.Parameter]]:
        """The trained tensors in sync order: each adapted matrix's values, then the densely trained parameters."""
        mods = sorted((f"{name}.weight", m) for name, m in spra_modules(self.model))
        params = dict(self.model.named_parameters())
        dense = sorted(dense_parameter_names(self.model))
        return [(key, m.spra_values) for key, m in mods] + [(n, params[n]) for n in dense]

    def _offer(self) -> dict:
        cfg = spra_config(self.model)
        if cfg is None:
            return {"problem": f"the trainer's {type(self.model).__name__} has no active SpaRA adapter: call "
                               f"apply_spra (or load_adapter) before WeightSender"}
        mods = sorted((f"{name}.weight", m) for name, m in spra_modules(self.model))
        combined = next((key for key, m in mods if m.mask_parts != ((cfg.seed, m.k),)), None)
        if combined:
            return {"problem": f"the trainer's {combined} is a combination of adapters, which a rollout cannot "
                               f"rebuild from one seed: sync it whole with merged_named_parameters(model)"}
        dense = [(n, tuple(global_shape(p))) for n, p in self._tensors()[len(mods):]]
        return {"problem": None, "mask_version": MASK_VERSION, "settings": sync_settings(cfg),
                "layers": [(key, tuple(m.weight_shape), m.k) for key, m in mods], "dense": dense,
                "dtype": _dtype_name(self.dtype),
                "entries": [(key, tuple(m.weight_shape), m.spra_indices) for key, m in mods]}

    def handshake(self) -> SyncLayout:
        """Send the adapter's settings, agree on the wire dtype, compare mask fingerprints with every rollout rank.
        A collective over ``group`` (on ``src``); ``ValueError`` on every rank when a rollout differs."""
        offer = self._offer()
        if not self.is_src:  # an FSDP2 / ZeRO-3 peer: gathers in send(), never joins the group
            if offer["problem"]:
                raise ValueError(offer["problem"])
            self.layout = SyncLayout(tuple(offer["layers"]), tuple(offer["dense"]), self.dtype or torch.float32)
            return self.layout
        public = {k: v for k, v in offer.items() if k != "entries"}
        _broadcast_object(public, src=self.src, group=self.group)
        if offer["problem"]:
            raise ValueError(f"rollout weight sync: {offer['problem']}")
        dtype = _agree(None, None, public["dtype"], src=self.src, group=self.group)
        _check_fingerprints(offer["entries"], public["settings"], src=self.src, group=self.group)
        self.layout = SyncLayout(tuple(public["layers"]), tuple(public["dense"]), dtype)
        self._buffer = torch.empty(self.layout.numel, dtype=dtype, device=collective_device(self.group))
        return self.layout

    @torch.no_grad()
    def send(self) -> int:
        """Broadcast the current values (cast to the wire dtype) in one collective; the bytes sent (0 on a training
        rank that is not ``src``). Under FSDP2 / ZeRO-3 call it on every training rank: it gathers each tensor."""
        if self.layout is None:
            raise ValueError("WeightSender.send() before handshake(): call sender.handshake() once first")
        offset = 0
        for _, p in self._tensors():
            whole = full_tensor(p).reshape(-1)  # a collective over the training ranks when p is sharded
            if self.is_src:
                self._buffer[offset: offset + whole.numel()].copy_(whole)
            offset += whole.numel()
        if not self.is_src:
            return 0
        assert offset == self._buffer.numel(), "the trainer's adapter changed after the handshake"
        dist.broadcast(self._buffer, src=self.src, group=self.group)
        return self._buffer.numel() * self._buffer.element_size()


class WeightReceiver:
    """A rollout rank's side: keeps a plain model (``model``, the base weights, no SpaRA) equal to the trainer's
    merged model, by receiving the values the ``WeightSender`` at global rank ``src`` broadcasts over ``group``.

    ``config``: the SpaRA settings this rollout expects; a trainer with other masks is refused at the handshake.
    ``None``: the trainer's (the masks are still rebuilt here, from this model's own shapes, and compared). A
    config without a seed takes the trainer's seed.
    """

    def __init__(self, model: nn.Module, *, config: SpraConfig | None = None,
                 group: dist.ProcessGroup | None = None, src: int = 0) -> None:
        self.model, self.config, self.group, self.src = model, config, group, int(src)
        _require_group()
        if dist.get_rank() == self.src:
            raise ValueError(f"WeightReceiver on rank {self.src}, the trainer's (src={self.src}): build it on the "
                             f"rollout ranks, and a WeightSender on the trainer")
        self.layout: SyncLayout | None = None
        self._targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._dense: list[torch.Tensor] = []
        self._buffer: torch.Tensor | None = None

    def handshake(self) -> SyncLayout:
        """Receive the trainer's settings, build this rollout's masks from the seed, keep the k original entries of
        each adapted weight, and compare fingerprints. ``ValueError`` on every rank when the masks differ."""
        self.restore()  # a second handshake starts from the base: the originals kept are the base's
        offer = _broadcast_object(None, src=self.src, group=self.group)
        if offer["problem"]:
            raise ValueError(f"rollout weight sync: {offer['problem']}")
        plan, problem = self._plan(offer)
        dtype = _agree(problem, plan["dtype"], offer["dtype"], src=self.src, group=self.group)
        _check_fingerprints(plan["entries"], plan["settings"], src=self.src, group=self.group)
        self._keep_originals(plan["entries"])
        params = dict(self.model.named_parameters())
        self._dense = [params[name].detach() for name, _ in offer["dense"]]
        self.layout = SyncLayout(tuple(offer["layers"]), tuple(offer["dense"]), dtype)
        self._buffer = torch.empty(self.layout.numel, dtype=dtype, device=collective_device(self.group))
        return self.layout

    def _plan(self, offer: dict) -> tuple[dict, str | None]:
        """This rollout's own masks (``entries``: ``(key, shape, indices)``), ``settings`` and weight ``dtype``, and
        a problem to report instead (every rank raises it)."""
        cfg = SpraConfig.from_dict(offer["settings"]) if self.config is None else self.config
        if cfg.seed is None:
            cfg = dataclasses.replace(cfg, seed=offer["settings"]["seed"])
        plan = {"settings": sync_settings(cfg), "entries": [], "dtype": None}
        if offer["mask_version"] != MASK_VERSION:
            return plan, (f"the trainer builds masks of mask_version {offer['mask_version']}, this rollout's spra_dist "
                          f"builds {MASK_VERSION}: install the same spra_dist on both")
        try:
            names = select_targets(self.model, cfg)
        except ValueError as e:
            return plan, f"the rollout model does not take the adapter: {e}"
        weights = [self.model.get_submodule(n).weight for n in names]
        dtypes = sorted({str(w.dtype) for w in weights})
        if len(dtypes) != 1 or not weights[0].is_floating_point():
            return plan, f"the rollout's adapted weights hold {dtypes}: load its base unquantized, in one dtype"
        requests = [(f"{n}.weight", tuple(w.shape), ((cfg.seed, budget(tuple(w.shape), lora_rank=cfg.lora_rank,
                                                                         density=cfg.density)),))
                    for n, w in zip(names, weights, strict=True)]
        masks = build_masks(requests)  # the function apply_spra builds the trainer's masks with
        plan["entries"] = sorted((key, shape, idx) for (key, shape, _), (idx, _) in zip(requests, masks, strict=True))
        plan["dtype"] = weights[0].dtype
        params = dict(self.model.named_parameters())
        missing = [(n, s) for n, s in offer["dense"] if n not in params or tuple(params[n].shape) != tuple(s)]
        if missing:
            name, shape = missing[0]
            return plan, f"the trainer trains {name} {list(shape)} densely; the rollout model has no such parameter"
        return plan, None

    def _keep_originals(self, entries: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
        """Per adapted weight: its flat view, its indices on its device, and its own copy of the k entries there."""
        self._targets = []
        for key, _, idx in entries:
            flat = self.model.get_parameter(key).detach().view(-1)
            idx = idx.to(flat.device)
            self._targets.append((flat, idx, flat.index_select(0, idx).clone()))

    @torch.no_grad()
    def receive(self) -> None:
        """Receive one sync and write ``W[idx] = originals + v`` into every adapted weight (O(k)), and the densely
        trained parameters whole. A collective over ``group``: one per ``send()`` of the trainer."""
        if self.layout is None:
            raise ValueError("WeightReceiver.receive() before handshake(): call receiver.handshake() once first")
        dist.broadcast(self._buffer, src=self.src, group=self.group)
        offset = 0
        for flat, idx, originals in self._targets:
            values = self._buffer[offset: offset + idx.numel()].to(flat.device)
            put(flat, idx, merged_entries(originals, values))
            offset += idx.numel()
        for p in self._dense:
            p.view(-1).copy_(self._buffer[offset: offset + p.numel()])
            offset += p.numel()

    @torch.no_grad()
    def restore(self) -> None:
        """Write the k original entries back: every adapted weight is the base again, bit for bit (densely trained
        parameters keep their last received value)."""
        for flat, idx, originals in self._targets:
            put(flat, idx, originals)


def _require_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("weight sync needs a process group holding the trainer and the rollout ranks: call "
                         "spra_dist.distributed.init_distributed() (under torchrun) before building a sender or "
                         "receiver")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _broadcast_object(obj, *, src: int, group: dist.ProcessGroup | None):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _labels(src: int, group: dist.ProcessGroup | None) -> tuple[list[str], int]:
    """What to call each rank of ``group`` in an error, and the trainer's group rank."""
    ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(dist.get_world_size(group))]
    return [f"the trainer (rank {r})" if r == src else f"rollout rank {r}" for r in ranks], ranks.index(src)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _agree(problem: str | None, own_dtype: torch.dtype | None, wire_dtype: str | None, *, src: int,
           group: dist.ProcessGroup | None) -> torch.dtype:
    """Every rank's problem (or None) and weight dtype, all-gathered: raise the first problem on every rank, else
    the wire dtype (``wire_dtype``, the trainer's choice, or the rollouts' one weight dtype)."""
    reply = {"problem": problem, "dtype": _dtype_name(own_dtype)}
    replies: list[dict] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(replies, reply, group=group)
    labels, _ = _labels(src, group)
    for label, r in zip(labels, replies, strict=True):
        if r["problem"]:
            raise ValueError(f"rollout weight sync refused by {label}: {r['problem']}")
    if wire_dtype is not None:
        return getattr(torch, wire_dtype)
    rollout = sorted({r["dtype"] for r in replies if r["dtype"] is not None})
    if len(rollout) != 1:
        raise ValueError(f"rollout weight sync: the rollout ranks hold weights in {rollout or 'no dtype'}: give "
                         f"WeightSender(dtype=...) the dtype to send the values in")
    return getattr(torch, rollout[0])


def _check_fingerprints(entries, settings: dict, *, src: int, group: dist.ProcessGroup | None) -> None:
    labels, trainer = _labels(src, group)
    _, mismatch = compare_masks(entries, config=settings, group=group, labels=labels, reference=trainer)
    if mismatch:
        raise ValueError(f"rollout weight sync refused: {mismatch}. Build the rollout from the trainer's base model "
                         f"and give WeightReceiver the trainer's SpraConfig (or none: it takes the trainer's)")
