"""Loss normalisation: the causal-LM loss is the sum over supervised tokens divided by the supervised tokens of
the whole global batch, so ranks x micro batches does not change the gradient when lengths differ."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spra_dist import apply_spra
from spra_dist.adapters.files import read_adapter
from spra_dist.core.model import trainable_parameters
from spra_dist.data.build import build_data
from spra_dist.distributed.parallelize import parallelize
from spra_dist.train.config import load_config
from spra_dist.train.loop import build_optimizer, build_schedule
from spra_dist.train.models import build_model
from spra_dist.train.recipe import micro_batches

ROOT = Path(__file__).resolve().parent.parent


def unequal_completions(path: Path, n: int = 16) -> Path:
    rows = [{"prompt": f"Q{i}: " + "x" * (i % 5), "completion": " " + "ab" * (1 + (i * 7) % 11)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, **top) -> Path:
    body = {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "max_grad_norm": None, "log_every": 1, "seed": 0,
            "model": {"source": "tiny_llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                      "intermediate_size": 64},
            "data": {"datasets": [{"path": str(unequal_completions(tmp_path / "train.jsonl")), "type": "completion"}],
                     "eval_datasets": [{"path": str(tmp_path / "train.jsonl"), "type": "completion",
                                        "max_samples": 4}],
                     "max_length": 64, "dataset_prepared_path": str(tmp_path / "cache")},
            "spra": {"target_modules": "all-linear", "lora_rank": 4, "seed": 7}, **top}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def gradients(cfg, splits) -> torch.Tensor:
    model = apply_spra(build_model(cfg.model, seed=0).model, cfg.spra)
    engine = parallelize(model, engine="none", mixed_precision="no", make_optimizer=lambda m: build_optimizer(m, cfg),
                         make_scheduler=lambda o: build_schedule(o, cfg))
    micro = micro_batches(splits, cfg, step=0, pad_id=256)
    for i, batch in enumerate(micro):
        engine.forward_backward(batch, n_micro=len(micro), last=i == len(micro) - 1)
    return torch.cat([p.grad.flatten() for _, p in trainable_parameters(engine.model)])


def test_micro_batches_do_not_change_the_gradient(tmp_path):
    path = write_config(tmp_path)
    grads = {}
    for accum in (1, 2, 4):
        cfg = load_config(path, [f"grad_accum={accum}"])
        splits = build_data(cfg.data, task="causal_lm", codec=build_model(cfg.model, seed=0).codec)
        parts = micro_batches(splits, cfg, step=0, pad_id=256)
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in parts]
        if accum == 4:
            assert len(set(counts)) > 1, counts  # the micro batches really hold different token counts
        grads[accum] = gradients(cfg, splits)
    for accum in (2, 4):
        assert torch.allclose(grads[accum], grads[1], rtol=1e-5, atol=1e-7), (grads[accum] - grads[1]).abs().max()
    # The mean of per-micro-batch means would differ: the test can tell the two apart.
    cfg = load_config(path, ["grad_accum=4"])
    model = apply_spra(build_model(cfg.model, seed=0).model, cfg.spra)
    for batch in micro_batches(splits, cfg, step=0, pad_id=256):
        batch.pop("num_items_in_batch")
        (model(**batch).loss / 4).backward()
    naive = torch.cat([p.grad.flatten() for _, p in trainable_parameters(model)])
    gap = ((naive - grads[1]).norm() / grads[1].norm()).item()
    print(f"grad_accum 2, 4 vs 1: max abs diff {max((grads[a] - grads[1]).abs().max().item() for a in (2, 4)):.1e}; "
          f"mean of micro means is off by {gap:.1%}")
    assert gap > 1e-2


@pytest.mark.slow
def test_two_ranks_by_two_micro_equal_one_rank_by_four(tmp_path):
    path = write_config(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def train(out: str, nproc: int, accum: int) -> dict:
        cli = ["-m", "spra_dist", "train", "--config", str(path), f"output_dir={tmp_path / out}", f"grad_accum={accum}"]
        cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc > 1 else []), *cli]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / out / "summary.json").read_text())
        assert summary["world_size"] == nproc
        return summary

    one = train("one", 1, 4)
    two = train("two", 2, 2)
    _, a = read_adapter(tmp_path / "one" / "adapter")
    _, b = read_adapter(tmp_path / "two" / "adapter")
    diff = max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)
    print(f"1x4 vs 2x2: adapter rel diff {diff:.2e}, eval loss {one['eval_loss_after']:.6f} vs "
          f"{two['eval_loss_after']:.6f}")
    assert diff < 1e-4
    assert abs(one["eval_loss_after"] - two["eval_loss_after"]) < 1e-5
