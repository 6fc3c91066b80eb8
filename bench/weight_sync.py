"""Bytes per rollout weight sync, sparse (the k values, ``spra_dist.distributed.sync``) against dense (every tensor
of the merged model, as TRL pushes to vLLM), in bf16, at the LoRA r=8 budget on every linear but the output head.

    HF_HUB_OFFLINE=1 python -m bench.weight_sync            # about 10 s; --json for one JSON line per model

SmolLM2-135M is measured: the packaged model loaded, SpaRA applied, one ``WeightSender.send()`` counted with
``CommCounter`` in a process group of one, and the dense side summed over ``merged_named_parameters(model,
dtype=bf16)``. Llama-3-8B and 70B are computed from their shapes (``LlamaConfig`` on the meta device, nothing
downloaded): k per matrix from ``spra_dist.core.masks.budget``, dense = every parameter once.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from spra_dist import SpraConfig, apply_spra
from spra_dist.adapters.merge import merged_named_parameters
from spra_dist.core.masks import budget
from spra_dist.core.model import select_targets

DTYPE = torch.bfloat16
RANK = 8
# (hidden, intermediate, layers, attention heads); 8 key/value heads, a 128256-token vocabulary, untied head
LLAMA3 = {"Llama-3-8B": (4096, 14336, 32, 32), "Llama-3-70B": (8192, 28672, 80, 64)}


def measured_smollm2() -> dict:
    """SmolLM2-135M: one real sync's bytes through the collective, and the merged model's bytes."""
    from spra_dist.demos.packaged import smollm2_dir
    from spra_dist.distributed.comm import CommCounter
    from spra_dist.distributed.group import init_distributed, shutdown
    from spra_dist.distributed.sync import WeightSender

    init_distributed(backend="gloo", group=True)  # a group of one: the broadcast runs and is counted
    try:
        counter = CommCounter.install()
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=DTYPE)
        apply_spra(model, SpraConfig(target_modules="all-linear", lora_rank=RANK, seed=0))
        sender = WeightSender(model, dtype=DTYPE)  # no rollout rank here to report its dtype: say it
        layout = sender.handshake()
        counter.reset()
        sent = sender.send()
        assert counter.bytes_by_op() == {"broadcast": sent} and sent == layout.nbytes
        dense = sum(t.numel() * t.element_size() for _, t in merged_named_parameters(model, dtype=DTYPE))
        return row("SmolLM2-135M", layout.k_total, sent, dense, "measured")
    finally:
        shutdown()


def computed_llama3(name: str) -> dict:
    hidden, inter, layers, heads = LLAMA3[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    cfg = SpraConfig(target_modules="all-linear", lora_rank=RANK)
    k_total = sum(budget(tuple(model.get_submodule(n).weight.shape), lora_rank=RANK, density=None)
                  for n in select_targets(model, cfg))
    size = torch.empty(0, dtype=DTYPE).element_size()
    dense = sum(p.numel() for p in model.parameters()) * size
    return row(name, k_total, k_total * size, dense, "computed")


def row(model: str, k_total: int, sparse: int, dense: int, how: str) -> dict:
    return {"model": model, "k_total": k_total, "sparse_bytes": sparse, "dense_bytes": dense,
            "ratio": dense / sparse, "how": how}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError


def table(rows: list[dict]) -> str:
    lines = ["| model | k (r=8, all linear) | sparse sync (k × 2 B) | dense sync (all weights, bf16) "
             "| dense / sparse | |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['k_total']:,} | {human(r['sparse_bytes'])} | {human(r['dense_bytes'])} | "
                     f"{r['ratio']:.0f}× | {r['how']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line per model instead of a table")
    args = parser.parse_args(argv)
    rows = [measured_smollm2(), *(computed_llama3(name) for name in LLAMA3)]
    print("\n".join(json.dumps(r) for r in rows) if args.json else table(rows))


if __name__ == "__main__":
    main()
