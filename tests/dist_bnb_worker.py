"""Worker: a bitsandbytes 4-bit base with SpaRA under DDP (engine ddp, gloo), trained on this rank's half of a fixed
batch; rank 0 writes the adapter and ``world.json`` (world size, its losses, whether every rank holds the same
values). tests/test_quantized_bnb.py runs the same steps in one process over the whole batch (``train``, imported
from here) and compares the two adapters.

    torchrun --nproc_per_node 2 tests/dist_bnb_worker.py BASE_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as tf

from spra_dist import SpraConfig, apply_spra, save_adapter, trainable_parameters
from spra_dist.distributed.group import init_distributed, shutdown
from spra_dist.distributed.parallelize import parallelize

STEPS, LR, VOCAB = 3, 1e-2, 300
SPRA = SpraConfig(lora_rank=4, seed=1)


def load_bnb(base: str | Path):
    """``base`` loaded as transformers loads QLoRA's base: bf16, every linear but the head in bitsandbytes 4-bit."""
    q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_quant_storage=torch.bfloat16)
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # its load report and progress bar
    try:
        return tf.AutoModelForCausalLM.from_pretrained(str(base), quantization_config=q, dtype=torch.bfloat16)
    finally:
        tf.logging.set_verbosity(verbosity)


def fixed_batch(n: int = 4, t: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(5))


def train(model, ids: torch.Tensor, *, engine: str, mixed_precision: str = "no") -> list[float]:
    """``STEPS`` AdamW steps of ``model`` (SpaRA applied) on ``ids`` under ``engine``; the losses. Each loss is the
    mean over this process's tokens, and DDP averages the ranks' gradients: equal halves give the whole batch's."""
    run = parallelize(model, engine=engine, mixed_precision=mixed_precision,
                      make_optimizer=lambda m: torch.optim.AdamW([p for _, p in trainable_parameters(m)], lr=LR),
                      make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0))
    losses = []
    for _ in range(STEPS):
        losses.append(float(run.forward_backward({"input_ids": ids, "labels": ids}, n_micro=1, last=True)))
        run.step(None)
    return losses


def main(base: str, out: str) -> None:
    rank, size = init_distributed(backend="gloo")
    model = apply_spra(load_bnb(base), SPRA)
    ids = fixed_batch().chunk(size)[rank]
    losses = train(model, ids, engine="ddp")
    save_adapter(model, Path(out) / "adapter")  # every rank (a collective); rank 0 writes
    values = torch.cat([p.detach().flatten() for _, p in trainable_parameters(model)])
    gathered = [torch.empty_like(values) for _ in range(size)]
    dist.all_gather(gathered, values)
    if rank == 0:
        report = {"world_size": size, "losses": losses,
                  "ranks_agree": all(torch.equal(g, values) for g in gathered)}
        (Path(out) / "world.json").write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
