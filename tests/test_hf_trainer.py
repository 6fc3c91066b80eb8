"""HF ``Trainer`` + DeepSpeed ZeRO-2 on 2 CPU ranks with ``SpraAdapterCallback``: adapter-only checkpoints.

    HF_HUB_OFFLINE=1 python -m pytest -q tests/test_hf_trainer.py

This file is also the worker that ``torchrun`` starts (``__main__`` below): each rank builds the same tiny
Llama, joins the gloo group, trains a few steps under the Trainer and reports what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_STEPS = 4, 2


class MotifData(torch.utils.data.Dataset):
    """Token blocks repeating a short motif: learnable in a few steps, no tokenizer needed."""

    def __init__(self, n: int = 64, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        motifs = torch.randint(3, 128, (n, 4), generator=g)
        self.blocks = motifs.repeat(1, length // 4)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def worker(out: Path) -> None:
    import torch.distributed as dist
    from tiny_models import tiny_llama
    from transformers import Trainer, TrainingArguments

    from spra_dist import SpraConfig, apply_spra, trainable_parameters
    from spra_dist.distributed.group import exit_rank, init_distributed, shutdown
    from spra_dist.integrations.hf import SpraAdapterCallback, hf_deepspeed_config

    rank, size = init_distributed(backend="gloo")  # before apply_spra: ranks agree on the seed and check masks
    model = apply_spra(tiny_llama(), SpraConfig(lora_rank=2, seed=1234))
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, ddp_backend="gloo", deepspeed=hf_deepspeed_config("zero2"),
        per_device_train_batch_size=4, max_steps=STEPS, save_steps=SAVE_STEPS, learning_rate=2e-2,
        warmup_steps=0, logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=MotifData(), callbacks=[SpraAdapterCallback()])
    trainer.train()
    # ZeRO-2 keeps a full copy of every parameter on each rank: identical values prove the ranks synchronised.
    local = torch.cat([p.detach().float().flatten() for _, p in trainable_parameters(model)])
    sums = [torch.zeros(2) for _ in range(size)]
    dist.all_gather(sums, torch.stack([local.sum(), local.abs().sum()]))
    if rank == 0:
        report = {"world_size": size, "trainer_world_size": args.world_size,
                  "deepspeed": trainer.is_deepspeed_enabled, "value_sums": [s.tolist() for s in sums],
                  "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
        (out / "world.json").write_text(json.dumps(report))
    shutdown()
    exit_rank(0)  # as spra train leaves: no interpreter finalization while DeepSpeed's gloo threads run


def _full_weight_files(folder: Path) -> list[Path]:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    found = [p for p in folder.rglob("*") if p.name in names or p.name.endswith("model_states.pt")]
    return found + [p for p in folder.rglob("global_step*")]


@pytest.mark.slow
def test_trainer_zero2_saves_adapter_only(tmp_path):
    from tiny_models import tiny_llama

    from spra_dist import load_adapter

    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    report = json.loads((tmp_path / "world.json").read_text())
    assert report["world_size"] == 2 and report["trainer_world_size"] == 2 and report["deepspeed"]
    assert report["value_sums"][0] == report["value_sums"][1], "ranks hold different values: not synchronised"
    assert len(report["losses"]) == STEPS

    for folder in (tmp_path / f"checkpoint-{SAVE_STEPS}" / "adapter", tmp_path / f"checkpoint-{STEPS}" / "adapter",
                   tmp_path / "adapter"):
        assert (folder / "adapter.safetensors").is_file() and (folder / "adapter_config.json").is_file(), folder
    assert (tmp_path / f"checkpoint-{STEPS}" / "trainer_state.json").is_file()
    assert _full_weight_files(tmp_path) == [], "the Trainer wrote full model weights"

    fresh = load_adapter(tiny_llama(), tmp_path / "adapter")
    values = torch.cat([p.detach().flatten() for n, p in fresh.named_parameters() if n.endswith("spra_values")])
    assert values.numel() > 0 and values.abs().sum() > 0, "loaded adapter values are all zero: nothing trained"
    assert abs(float(values.sum()) - report["value_sums"][0][0]) < 1e-3 * max(1.0, report["value_sums"][0][1])


def test_hf_deepspeed_config_keeps_only_autos_the_trainer_fills():
    from spra_dist.integrations.hf import hf_deepspeed_config

    config = hf_deepspeed_config("zero2")
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"] == {"enabled": "auto"}
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == "auto" and "allgather_bucket_size" not in zero
    assert "optimizer" not in config and "scheduler" not in config


def test_rotate_keeps_the_newest_checkpoints(tmp_path):
    from spra_dist.integrations.hf import _rotate

    for step in (2, 10, 4, 8):
        (tmp_path / f"checkpoint-{step}" / "adapter").mkdir(parents=True)
    (tmp_path / "adapter").mkdir()
    _rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoint-10", "checkpoint-8"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_models.py beside this file
    worker(Path(sys.argv[1]))
