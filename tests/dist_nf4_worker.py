"""Worker: the bytes FSDP2 all-gathers for one transformer block, over a bf16 base and over the same base in NF4.

    torchrun --nproc_per_node 2 tests/dist_nf4_worker.py OUT.json

One forward of block 0 unshards that block once: the all-gather this rank hands in is its shard of every parameter
of the block (the packed NF4 parts for an NF4 weight). Rank 0 writes, per base, the bytes counted at
``torch.distributed`` and the closed form the test checks them against, and the block's output.
"""

import json
import sys

import torch
import transformers as tf

from spra_dist import SpraConfig, apply_spra, quantize_targets
from spra_dist.core.quantized import is_nf4
from spra_dist.distributed.comm import CommCounter
from spra_dist.distributed.fsdp import apply_fsdp2
from spra_dist.distributed.group import init_distributed, shutdown

CONFIG = dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, tie_word_embeddings=False)


def shard_bytes(block: torch.nn.Module) -> int:
    """What this rank hands to the block's all-gather: each parameter's local shard, NF4's three sharded parts."""
    total = 0
    for p in block.parameters():
        local = p.to_local()
        if is_nf4(local):
            total += sum(t.nbytes for t in (local.quantized_data, local.quantized_scalers, local.quantization_factor))
        else:
            total += local.nbytes
    return total


def block_output(quantize: str, counter: CommCounter) -> tuple[int, int, torch.Tensor]:
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    apply_spra(model, SpraConfig(lora_rank=4, seed=1))
    quantize_targets(model, quantize)
    apply_fsdp2(model, mp_policy=None)  # every parameter gathered in its own dtype: weights bf16, values fp32
    block = model.model.layers[0]
    x = torch.randn(2, 8, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(1)).bfloat16()
    position = model.model.rotary_emb(x, torch.arange(8)[None].expand(2, -1))
    counter.reset()
    with torch.no_grad():
        y = block(x, position_embeddings=position)
    y = y[0] if isinstance(y, tuple) else y
    return counter.bytes_by_op().get("all_gather_single", 0) + counter.bytes_by_op().get(
        "all_gather_into_tensor", 0), shard_bytes(block), y.float()


def main() -> None:
    counter = CommCounter.install()
    rank, _ = init_distributed(backend="gloo")
    result = {}
    for quantize in ("none", "nf4"):
        counted, expected, y = block_output(quantize, counter)
        result[quantize] = {"counted": counted, "expected": expected, "out": y.flatten()[:64].tolist()}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    shutdown()


if __name__ == "__main__":
    main()
