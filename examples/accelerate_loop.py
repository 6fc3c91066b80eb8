"""SpaRA in your own accelerate loop: prepare, backward, save the adapter. DDP or the DeepSpeed plugin.

    # one process
    python examples/accelerate_loop.py --out runs/accelerate_loop
    # GPUs: one process each
    accelerate launch --config_file configs/accelerate/ddp.yaml examples/accelerate_loop.py --engine ddp
    # CPU, 2 gloo processes. DDP needs ACCELERATE_USE_CPU (--cpu would start one process); the DeepSpeed
    # plugin must run without it (accelerate's CPU mode drops the plugin), on gloo.
    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \\
        --main_process_port 0 examples/accelerate_loop.py --engine ddp --mixed-precision bf16
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 --main_process_port 0 \\
        examples/accelerate_loop.py --engine zero3 --mixed-precision bf16

``--engine ddp`` keeps the launcher's DDP; ``zero2`` / ``zero3`` pass a ``DeepSpeedPlugin`` to the Accelerator.
The model is a tiny random Llama built from a config, the data token blocks of a few repeated motifs, so the
script runs anywhere in seconds; swap in your own model and data. ``--global-batch`` is split over the
processes, so every world size trains on the same examples per step and ends with the same adapter.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from spra_dist import SpraConfig, apply_spra, save_adapter, trainable_parameters
from spra_dist.distributed.group import exit_rank


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["ddp", "zero2", "zero3"], default="ddp",
                   help="ddp: the launcher's DDP (or one plain process); zero2 / zero3: DeepSpeed plugin")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--out", default="runs/accelerate_loop")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    return p.parse_args()


def build_accelerator(engine: str, mixed_precision: str) -> Accelerator:
    """An Accelerator for ``engine``; ``ValueError`` when the launch would not give that engine on every rank."""
    plugin = None
    if engine != "ddp":
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            raise ValueError(f"--engine {engine}: unset ACCELERATE_USE_CPU; accelerate's CPU mode drops the DeepSpeed "
                             f"plugin (the script asks DeepSpeed for gloo on CPU itself)")
        # stage3_param_persistence_threshold 0: even this tiny model's parameters are really partitioned.
        plugin = DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": int(engine[-1]), "stage3_param_persistence_threshold": 0},
        })
    # Under a launcher on CPU, name gloo: DeepSpeed would ask for nccl. A plain `python` run has no group to form.
    backend = "gloo" if "WORLD_SIZE" in os.environ and not torch.cuda.is_available() else None
    accelerator = Accelerator(mixed_precision=mixed_precision, deepspeed_plugin=plugin,
                              kwargs_handlers=[InitProcessGroupKwargs(backend=backend)] if backend else [])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ValueError(f"the launcher started {launched} processes but this one is in a group of "
                         f"{accelerator.num_processes}: on CPU, set ACCELERATE_USE_CPU=true for --engine ddp")
    if plugin is not None and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(f"--engine {engine} asked for DeepSpeed, accelerate set up {accelerator.distributed_type}")
    return accelerator


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same random base on every process
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def motif_blocks(n: int = 64, length: int = 16) -> TensorDataset:
    motifs = torch.randint(3, 128, (4, 4), generator=torch.Generator().manual_seed(0))
    blocks = motifs.repeat(1, length // 4).repeat(n // 4, 1)
    return TensorDataset(blocks[torch.randperm(n, generator=torch.Generator().manual_seed(1))])


def main() -> None:
    args = parse_args()
    accelerator = build_accelerator(args.engine, args.mixed_precision)
    # After the Accelerator joined the process group: the ranks agree on the mask seed and check their masks.
    model = apply_spra(tiny_llama(), SpraConfig(target_modules="all-linear", lora_rank=2, seed=1234))
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=args.lr, weight_decay=0.0)
    if args.global_batch % accelerator.num_processes:
        raise ValueError(f"--global-batch {args.global_batch} must divide by {accelerator.num_processes} processes")
    loader = DataLoader(motif_blocks(), batch_size=args.global_batch // accelerator.num_processes, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    losses = []
    for step, (ids,) in zip(range(args.steps), loader, strict=False):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach().float(), reduction="mean").item())
        accelerator.print(f"step {step + 1}: loss {losses[-1]:.4f}")

    out = Path(args.out)
    save_adapter(accelerator.unwrap_model(model), out / "adapter")  # every rank: ZeRO-3 gathers the k values
    if accelerator.is_main_process:
        report = {"world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                  "mixed_precision": accelerator.mixed_precision, "losses": losses}
        (out / "report.json").write_text(json.dumps(report, indent=1))
        print(f"adapter: {out / 'adapter'}  loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # Every file is written: a rank of a multi-process job leaves without Python's finalization, which can abort
    # ("terminate called without an active exception") while DeepSpeed's gloo threads still run; see
    # docs/reliability.md, "Clean exit". One process returns and exits normally.
    exit_rank(0)


if __name__ == "__main__":
    main()
