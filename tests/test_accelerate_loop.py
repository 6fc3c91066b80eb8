"""examples/accelerate_loop.py (a user's own accelerate loop) on 2 CPU gloo ranks under DDP and the DeepSpeed
plugin (ZeRO-2, ZeRO-3), against the same script in one process; parity measured as in test_distributed.py
(max over adapter tensors of ||a - b|| / ||a||).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import adapter_rel_diff

from spra_dist.adapters.files import read_adapter

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "examples" / "accelerate_loop.py")
BASE_ENV = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
ENV = dict(BASE_ENV, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def launch(out: Path, engine: str, precision: str, *, nproc: int, plain: bool = False) -> dict:
    args = [SCRIPT, "--engine", engine, "--mixed-precision", precision, "--out", str(out)]
    if plain:  # one ordinary process, no launcher
        cmd, env = [sys.executable, *args], ENV
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate/ddp.yaml"), "--num_processes", str(nproc), "--main_process_port", "0",
               *args]
        # DDP on CPU needs accelerate's CPU mode; the DeepSpeed plugin must run without it (see the script).
        env = dict(ENV, ACCELERATE_USE_CPU="true") if engine == "ddp" else ENV
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == nproc and report["mixed_precision"] == precision
    assert report["losses"][-1] < report["losses"][0]
    return report


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for precision in ("no", "bf16"):
        runs[precision] = tmp_path_factory.mktemp(f"one_{precision}")
        launch(runs[precision], "ddp", precision, nproc=1, plain=True)
    return runs


@pytest.mark.parametrize(("engine", "precision"), [("ddp", "bf16"), ("zero2", "no"), ("zero3", "no")])
def test_two_ranks_match_one_process(engine, precision, one_process, tmp_path):
    report = launch(tmp_path, engine, precision, nproc=2)
    expected = "DistributedType.MULTI_CPU" if engine == "ddp" else "DistributedType.DEEPSPEED"
    assert report["distributed_type"] == expected
    assert adapter_rel_diff(one_process[precision], tmp_path) < 1e-4


def test_zero3_bf16_saves_fp32_master_values(tmp_path):
    """DeepSpeed's bf16 computes with bf16 values (and bf16 gradients: 2 ranks matched its own 1-process run to
    2.4e-3, bf16 precision); the adapter holds the optimizer's fp32 master values, not the bf16 copies."""
    launch(tmp_path, "zero3", "bf16", nproc=2)
    _, tensors = read_adapter(tmp_path / "adapter")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any((t != t.bfloat16().float()).any() for t in tensors.values())  # not bf16 values widened


def test_deepspeed_plugin_refuses_accelerate_cpu_mode(tmp_path):
    env = dict(ENV, ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, SCRIPT, "--engine", "zero2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "unset ACCELERATE_USE_CPU" in proc.stderr
