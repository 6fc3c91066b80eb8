"""Worker: merge_adapter and load_adapter on a model that FSDP2 or ZeRO-3 shards, against one process."""

import json
import sys
import tempfile
from pathlib import Path

import torch
from tiny_models import batch, tiny_llama

from spra_dist import SpraConfig, apply_spra, load_adapter, merge_adapter, save_adapter, spra_modules
from spra_dist.distributed.group import exit_rank, init_distributed, shutdown, world


def adapted(values_seed: int):
    model = apply_spra(tiny_llama(), SpraConfig(seed=5))
    g = torch.Generator().manual_seed(values_seed)
    with torch.no_grad():
        for _, m in spra_modules(model):
            m.spra_values.copy_(torch.randn(m.k, generator=g) * 0.1)
    return model


def shard(model, engine: str):
    if engine == "fsdp2":
        from spra_dist.distributed.fsdp import apply_fsdp2

        return apply_fsdp2(model, mp_policy=None)
    import deepspeed

    from spra_dist.distributed.deepspeed import fill_deepspeed_config, load_deepspeed_config

    config = load_deepspeed_config("zero3")
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config = fill_deepspeed_config(config, batch_size=2, grad_accum=1, world_size=world()[1], max_grad_norm=None,
                                   mixed_precision="no")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ds, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    assert any(p.ds_tensor.numel() < p.ds_numel for p in model.parameters())  # really partitioned
    return ds.module


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def main(engine: str, out: str) -> None:
    init_distributed()
    ids = batch()
    reference = adapted(values_seed=1)
    expected = logits(reference, ids)
    tmp = Path(tempfile.gettempdir()) / f"spra_merge_{engine}"
    save_adapter(reference, tmp)  # rank 0 writes, every rank returns once the files exist

    loaded = shard(adapted(values_seed=2), engine)
    load_adapter(loaded, tmp)  # into the sharded model: values re-laid out in the engine's shards
    after_load = (logits(loaded, ids) - expected).abs().max().item()

    sharded = shard(adapted(values_seed=1), engine)
    merge_adapter(sharded)
    after_merge = (logits(sharded, ids) - expected).abs().max().item()
    plain = merge_adapter(adapted(values_seed=1))
    merged_ref = (logits(plain, ids) - expected).abs().max().item()
    if world()[0] == 0:
        Path(out).write_text(json.dumps({"world_size": world()[1], "after_load": after_load,
                                         "after_merge": after_merge, "plain_merge": merged_ref}))
    shutdown()
    exit_rank(0)  # as spra train leaves: no interpreter finalization while DeepSpeed's gloo threads run


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
