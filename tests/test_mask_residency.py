"""Where a layer keeps its mask: outside parameters and buffers, copied per op under host residency, never saved."""

import gc
import weakref

import pytest
import torch
from tiny_models import batch, tiny_llama

from spra_dist import SpraConfig, apply_spra, save_adapter, spra_modules
from spra_dist.core.kernels import ops
from spra_dist.core.layer import build_masks, mask_buffers


def adapted(residency="host"):
    return apply_spra(tiny_llama(), SpraConfig(seed=7, mask_residency=residency))


def test_mask_is_no_parameter_buffer_or_state_dict_entry_and_engines_moving_the_module_leave_it():
    """FSDP2 and ZeRO-3 shard parameters, DDP broadcasts buffers, ``to`` / ``to_empty`` move both: a mask kept as
    either would sit whole on every GPU or cross the wire. Only the values show up."""
    model = adapted()
    layers = [m for _, m in spra_modules(model)]
    masks = [(m.spra_indices, m.spra_crow) for m in layers]
    tensors = [t for t in (*model.parameters(), *model.buffers()) if not t.is_floating_point()]
    assert tensors == [] and not any("spra_indices" in k or "crow" in k for k in model.state_dict())
    model.to(torch.float64)
    model.to_empty(device="cpu")
    for m, (idx, crow) in zip(layers, masks, strict=True):
        assert m.spra_indices is idx and m.spra_crow is crow and idx.dtype == torch.int32
        assert torch.equal(idx.long(), m.mask())


def test_mask_bytes_per_residency():
    model = adapted()
    m = spra_modules(model)[0][1]
    size = 4 * m.k + 4 * (m.weight_shape[0] + 1)  # int32 indices and row pointers
    assert m.mask_bytes() == {"device": 0, "host": size, "transient": size}
    m.mask_residency = "device"
    assert m.mask_bytes() == {"device": size, "host": 0, "transient": 0}


def test_host_mask_goes_to_the_device_once_per_op_and_no_copy_outlives_it(monkeypatch):
    """Forward copies the indices, backward the indices (once for both gradients) and the row pointers: 2·4k + crow
    bytes a step. The autograd context keeps the host copy, so every device copy is freed by the end of its op:
    at the end of the forward no layer's mask is on the device."""
    model = adapted()
    layers = [m for _, m in spra_modules(model)]
    host = {id(t) for m in layers for t in (m.spra_indices, m.spra_crow)}
    copies: list[weakref.ref] = []
    moved = [0]
    orig = ops.to_device

    def to_device(mask, like):
        if id(mask) not in host:
            return orig(mask, like)
        moved[0] += mask.nbytes
        copy = mask.clone()  # what a GPU copy is
        copies.append(weakref.ref(copy))
        return copy

    monkeypatch.setattr(ops, "to_device", to_device)
    loss = model(input_ids=batch(), labels=batch()).logits.float().pow(2).mean()
    gc.collect()
    assert len(copies) == len(layers) and all(c() is None for c in copies)  # forward: one per layer, all freed
    loss.backward()
    gc.collect()
    assert all(c() is None for c in copies)
    assert moved[0] == sum(2 * m.spra_indices.nbytes + m.spra_crow.nbytes for m in layers)


def test_masks_built_in_parallel_equal_serial_ones():
    requests = [(f"l{i}.weight", (96, 64 + i), ((3, 50 + i), (4, 20))) for i in range(6)]
    serial, parallel = build_masks(requests, threads=1), build_masks(requests, threads=2)
    for (a, ca), (b, cb), r in zip(serial, parallel, requests, strict=True):
        assert torch.equal(a, b) and torch.equal(ca, cb)
        assert torch.equal(a, mask_buffers(*r)[0])


def test_residency_is_a_setting_of_the_rank_not_of_the_adapter(tmp_path):
    with pytest.raises(ValueError, match=r"mask_residency='gpu'.*host.*device"):
        SpraConfig(mask_residency="gpu").validate()
    cfg = SpraConfig(seed=1, mask_residency="device")
    assert "mask_residency" not in cfg.adapter_dict() and cfg.to_dict()["mask_residency"] == "device"
    model = apply_spra(tiny_llama(), cfg)
    assert all(m.mask_residency == "device" for _, m in spra_modules(model))
    import json

    saved = json.loads((save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert "mask_residency" not in saved["spra_config"]


def test_mask_threads_share_the_node_with_the_other_ranks(monkeypatch):
    from spra_dist.core.masks import host_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert host_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert host_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert host_threads() == 1
