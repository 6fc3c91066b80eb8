"""Load a saved base into a model built on the meta device, after sharding: each rank reads only what it keeps.

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    base = BaseCheckpoint.open(path)
    initial = initial_values(model, base)        # what from_pretrained draws for tensors the base lacks (a new head)
    apply_spra(model, cfg)
    plan = plan_load(model, base, initial=initial, device=device)   # ValueError naming a tensor the base lacks
    apply_fsdp2(model); load_fsdp2(model, plan)  # or: load_zero3(model, plan, config=ds_config); deepspeed.initialize

FSDP2: ``to_empty`` gives each rank its rows of every parameter (``Shard(0)``), and each rank reads just those rows
from the safetensors files (``get_slice(name)[start:stop]``), one tensor at a time: a rank holds its shard plus one
tensor's rows in flight, and nothing crosses the wire. (Rank 0 reading everything and broadcasting it with
``set_model_state_dict(..., broadcast_from_rank0=True)`` sends the whole base to every rank and holds it on rank 0.)
ZeRO-3: modules are materialised one at a time, rank 0 reads their tensors, and ``deepspeed.zero.Init(module=...)``
partitions them (it broadcasts rank 0's values first, as for a model built inside its context): a rank holds its
partitions plus one module. (transformers' own ZeRO-3 loading, ``from_pretrained`` under ``HfDeepSpeedConfig``,
builds the model partitioned before SpaRA is applied, and ``apply_spra`` cannot size masks from weights whose data
ZeRO-3 has emptied; its rank 0 also reads every file into one state dict.)

Then, as ``from_pretrained`` does, every loaded tensor is marked initialised and transformers' ``initialize_weights``
recomputes what no checkpoint holds (rotary ``inv_freq``, which ``to_empty`` leaves as garbage); SpaRA values start
at zero, and parameters the base lacks take ``initial``. A parameter that is neither in the base nor trained is an
error, never a silent random or empty tensor.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from spra_dist.core.layer import SpraLinear
from spra_dist.core.model import dense_parameter_names, reset_spra_parameters
from spra_dist.core.quantized import fill_nf4_rows, is_nf4, nf4_on_meta_for
from spra_dist.distributed.deepspeed import start_deepspeed_comm

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class BaseCheckpoint:
    """The safetensors files of a model written by ``save_pretrained``: one file, or shards with an index."""

    path: Path
    files: dict[str, Path]
    """Tensor name -> the file that holds it."""

    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, path: str | Path) -> BaseCheckpoint:
        """Read the headers (names and shapes) of every file; no tensor data."""
        path = Path(path)
        if (path / INDEX).is_file():
            names = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        elif (path / SINGLE).is_file():
            names = [SINGLE]
        else:
            raise ValueError(f"{path} holds neither {SINGLE} nor {INDEX}; a sharded engine loads safetensors only: "
                             f"re-save the model with save_pretrained, or train with engine=ddp")
        files, shapes = {}, {}
        for name in names:
            with safe_open(path / name, framework="pt") as f:
                for key in f.keys():
                    files[key], shapes[key] = path / name, tuple(f.get_slice(key).get_shape())
        return cls(path, files, shapes)

    def read_into(self, out: torch.Tensor, key: str, rows: tuple[int, int] | None = None) -> None:
        """Copy tensor ``key``, or its rows ``start:stop``, into ``out`` (converting the dtype).

        The file is opened for this one tensor: safetensors maps it, and the pages read stay in this process's
        memory while it is open, so keeping it open over many tensors would hold all of them."""
        with safe_open(self.files[key], framework="pt") as f:
            out.copy_(f.get_slice(key)[rows[0]:rows[1]] if rows else f.get_tensor(key))


@dataclass
class LoadPlan:
    """Where each tensor of a model built on meta gets its value, checked before anything is allocated."""

    base: BaseCheckpoint
    keys: dict[str, str]
    """Parameter or persistent buffer name -> the base's tensor."""

    initial: dict[str, torch.Tensor]
    """Parameter name -> its whole value, written instead of the base's: parameters the base lacks (a new task
    head, ``initial_values``) and, on resume, the trained values."""

    device: torch.device


def plan_load(model: nn.Module, base: BaseCheckpoint, *, initial: dict[str, torch.Tensor],
              device: torch.device) -> LoadPlan:
    """Match every tensor of the adapted, still unsharded ``model`` to the base. ``ValueError`` naming the
    parameters the base lacks unless they are trained (``spra.trainable_modules``, with a value in ``initial``),
    or a tensor whose shape differs."""
    keys = _match(model, base)
    _place_nf4_metadata(model, device)
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for name, key in keys.items():
        shape = list(tensors[name].shape)
        if list(base.shapes[key]) != shape:
            raise ValueError(f"{base.path}: {key} has shape {list(base.shapes[key])}, the model's {name} {shape}; "
                             f"model.name_or_path's config.json does not match its weights")
    trained = set(dense_parameter_names(model))
    lacking = [name for name, _ in model.named_parameters() if name not in keys and not name.endswith("spra_values")
               and not (name in trained and name in initial)]
    if lacking:
        raise ValueError(f"{base.path} has no tensor for {len(lacking)} parameter(s) of {type(model).__name__}: "
                         f"{lacking[:4]}; point model.name_or_path at the checkpoint of this architecture, or train "
                         f"a new module such as a task head densely (spra.trainable_modules)")
    return LoadPlan(base, keys, dict(initial), device)


def _place_nf4_metadata(model: nn.Module, device: torch.device) -> None:
    for m in model.modules():
        if isinstance(m, SpraLinear) and is_nf4(m.weight) and m.weight.device.type == "meta":
            m.weight = nn.Parameter(nf4_on_meta_for(m.weight, device), requires_grad=False)


def initial_values(model: nn.Module, base: BaseCheckpoint) -> dict[str, torch.Tensor]:
    """The values ``from_pretrained`` gives the parameters ``base`` lacks (a new task head): transformers' own
    ``_init_weights`` on a CPU copy of each module that owns one, in the order ``from_pretrained`` draws them.

    Call it on the model just built on meta, where ``from_pretrained`` would have drawn them, so the random stream
    after it is today's too."""
    keys = _match(model, base)
    lacking = {name for name, _ in model.named_parameters() if name not in keys and not name.endswith("spra_values")}
    values = {}
    for prefix, module, owner in _post_order(model):
        own = {f"{prefix}{n}": n for n, _ in module.named_parameters(recurse=False)}
        if not own.keys() & lacking:
            continue
        fresh = copy.deepcopy(module).to_empty(device="cpu", recurse=False)
        for name, attr in own.items():
            if name not in lacking:
                getattr(fresh, attr)._is_hf_initialized = True  # loaded, so from_pretrained leaves it alone
        with torch.no_grad():
            owner._init_weights(fresh)
        values.update({name: getattr(fresh, attr).detach() for name, attr in own.items() if name in lacking})
    return values


@torch.no_grad()
def load_fsdp2(model: nn.Module, plan: LoadPlan) -> None:
    """Materialise an FSDP2-sharded meta ``model`` on ``plan.device`` and fill each rank's rows (call on every rank)."""
    from torch.distributed.tensor import DTensor

    model.to_empty(device=plan.device)
    reset_spra_parameters(model)
    for name, p in model.named_parameters():
        local, rows = (p.to_local(), _local_rows(name, p)) if isinstance(p, DTensor) else (p, None)
        _fill(plan, name, local, rows)
    _finish(model, plan)


@torch.no_grad()
def load_zero3(model: nn.Module, plan: LoadPlan, *, config: dict) -> None:
    """Materialise a meta ``model`` module by module and partition each with ZeRO-3 (call on every rank, before
    ``deepspeed.initialize``, which then finds every parameter partitioned, as after a ``zero.Init`` build)."""
    import deepspeed

    # zero.Init reads the world size from DeepSpeed's own comm layer, which deepspeed.initialize would start only
    # later: without it the config's batch check sees a world of one and fails.
    start_deepspeed_comm()
    names = {id(p): name for name, p in model.named_parameters()}
    dtype = _zero3_dtype(config)
    staging = torch.empty(0, dtype=torch.uint8, device=plan.device)
    for _, module, _ in _post_order(model):
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=plan.device)
        fresh = [p for p in module.parameters(recurse=False) if p.is_meta]  # a tied one is done already
        if not fresh:
            continue
        staging = _stage(fresh, staging, dtype)
        if isinstance(module, SpraLinear):
            module.reset_spra_parameters()
        if dist.get_rank() == 0:  # zero.Init broadcasts rank 0's values before it partitions
            for p in fresh:
                _fill(plan, names[id(p)], p.data, None)
        deepspeed.zero.Init(module=module, config_dict_or_path=config)
        assert all(p.data.numel() == 0 for p in fresh), "ZeRO-3 kept a whole tensor: the staging buffer is not free"
    _finish(model, plan)


def _zero3_dtype(config: dict) -> torch.dtype | None:
    """The dtype of ZeRO-3's parameters in bf16 / fp16 mode. ``deepspeed.initialize`` casts the parameters of a model
    it gets whole, but takes a partitioned one as built under ``zero.Init``, already in that dtype."""
    if any(config.get(key, {}).get("enabled") is True for key in ("bf16", "bfloat16")):
        return torch.bfloat16
    return torch.float16 if config.get("fp16", {}).get("enabled") is True else None


def _stage(params: list[nn.Parameter], staging: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Give each meta parameter storage in ``staging``, in ``dtype`` if floating (the buffer grows when too small,
    and is returned for the next module). ``zero.Init`` copies each rank's partition out and lets go of the whole
    tensors, so the buffer is free again after it. One buffer reused rather than fresh tensors per module: on a CPU
    the freed whole tensors left holes in the heap that the partitions did not fill (a 374 MB base: 326 MB peak
    growth per rank instead of 248 MB)."""
    dtypes = [dtype if dtype is not None and p.is_floating_point() else p.dtype for p in params]
    sizes = [-(-p.numel() * d.itemsize // 64) * 64 for p, d in zip(params, dtypes, strict=True)]  # 64-byte aligned
    if staging.numel() < sum(sizes):
        staging = torch.empty(sum(sizes), dtype=torch.uint8, device=staging.device)
    offset = 0
    for p, d, size in zip(params, dtypes, sizes, strict=True):
        # set_, not a view: a view would share the buffer's version counter with every other parameter, and
        # autograd would see each in-place gather as a change of the tensors it saved
        data = torch.empty(0, dtype=d, device=staging.device).set_(staging.untyped_storage(), offset // d.itemsize,
                                                                    p.shape)
        # swapped in place: the object stays, so a tied parameter stays one parameter in both its modules
        torch.utils.swap_tensors(p, nn.Parameter(data, requires_grad=p.requires_grad))
        offset += size
    return staging


def _fill(plan: LoadPlan, name: str, out: torch.Tensor, rows: tuple[int, int] | None) -> None:
    """Write parameter ``name`` (its ``rows``, or all of it) into ``out``; SpaRA values keep their zeros."""
    if name in plan.initial:
        value = plan.initial[name]
        out.copy_(value[rows[0]:rows[1]] if rows else value)
    elif name in plan.keys and is_nf4(out):  # packed from the whole matrix: one matrix in flight, as bf16
        key = plan.keys[name]
        full = torch.empty(plan.base.shapes[key], dtype=out.dtype, device=plan.device)
        plan.base.read_into(full, key)
        fill_nf4_rows(out, full, rows)
    elif name in plan.keys:
        plan.base.read_into(out, plan.keys[name], rows)


def _finish(model: nn.Module, plan: LoadPlan) -> None:
    """Persistent buffers from the base, then what ``from_pretrained`` does after loading: mark every loaded
    tensor, and let transformers' ``initialize_weights`` recompute the rest (non-persistent buffers)."""
    buffers = dict(model.named_buffers())
    for name, key in plan.keys.items():
        if name in buffers:
            plan.base.read_into(buffers[name], key)
            buffers[name]._is_hf_initialized = True
    for p in model.parameters():
        p._is_hf_initialized = True
    if hasattr(model, "initialize_weights"):
        model.initialize_weights()


def _local_rows(name: str, p: torch.Tensor) -> tuple[int, int]:
    """This rank's rows of DTensor ``p`` under FSDP2's ``Shard(0)`` on a 1-D mesh: ``torch.chunk``'s split."""
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"{name} is placed {tuple(p.placements)}; loading a base reads FSDP2's rows (Shard(0) on a "
                         f"1-D mesh): shard with spra_dist.distributed.fsdp.apply_fsdp2")
    n, size, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-n // size)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    assert p.to_local().shape[0] == stop - start, f"{name}: local rows {p.to_local().shape[0]} != {stop - start}"
    return start, stop


def _match(model: nn.Module, base: BaseCheckpoint) -> dict[str, str]:
    """Parameter and persistent buffer names -> the base's names for them, where it has them: the same name,
    without or with the model's ``base_model_prefix`` (a bare base model's checkpoint under a task head), or any
    name a tied parameter also goes by."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    names = {names[0]: names for names in by_id.values()}  # tied weights: the first name, as named_parameters
    names.update({name: [name] for name in _persistent_buffers(model)})
    keys = {}
    for name, aliases in names.items():
        for alias in aliases:
            candidates = [alias, alias.removeprefix(f"{prefix}.") if alias.startswith(f"{prefix}.") else
                          f"{prefix}.{alias}"] if prefix else [alias]
            found = next((c for c in candidates if c in base.files), None)
            if found is not None:
                keys[name] = found
                break
    return keys


def _persistent_buffers(model: nn.Module) -> list[str]:
    return [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name, buf in module.named_buffers(recurse=False)
            if buf is not None and name not in module._non_persistent_buffers_set]


def _post_order(module: nn.Module, prefix: str = "", owner: nn.Module | None = None
                ) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(prefix, module, owner)`` children first, as ``initialize_weights`` visits them; ``owner`` is the nearest
    transformers model above (or at) the module, whose ``_init_weights`` initialises it."""
    if hasattr(module, "_init_weights"):
        owner = module
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.", owner)
    yield prefix, module, owner
