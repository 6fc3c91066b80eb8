"""The launch/ wrappers: shell syntax, argument errors, and real 2-rank runs through torchrun and accelerate.

    HF_HUB_OFFLINE=1 python -m pytest -q tests/test_launchers.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
CONFIG = "configs/train/debug_tiny_llama.yaml"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def _env(**extra: str) -> dict[str, str]:
    # The wrappers find torchrun / accelerate / deepspeed on PATH: put this interpreter's environment first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, HF_HUB_OFFLINE="1", NPROC="2", **extra)


def _run(args: list[str], *, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_scripts_found():
    names = {p.name for p in SCRIPTS}
    assert {"torchrun.sh", "accelerate.sh", "deepspeed.sh", "multinode_torchrun.sh"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["launch/torchrun.sh", "zero9", CONFIG], "ENGINE=zero9 is not one of"),
    (["launch/torchrun.sh", "ddp", "missing.yaml"], "CONFIG missing.yaml not found"),
    (["launch/accelerate.sh", "none", CONFIG], "ENGINE=none: use ddp, fsdp2"),
    (["launch/deepspeed.sh", "zero4", CONFIG], "STAGE=zero4"),
    (["launch/torchrun.sh"], "usage: launch/torchrun.sh"),
    (["launch/multinode_torchrun.sh", "ddp", CONFIG], "set NNODES"),
])
def test_bad_arguments_exit_2_with_the_fix(args, message):
    proc = _run(args, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)


def _check_run(proc: subprocess.CompletedProcess, out: Path, *, engine: str) -> dict:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2, summary
    assert summary["engine"] == engine, summary
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    return summary


@pytest.mark.slow
def test_torchrun_ddp_two_ranks(tmp_path):
    proc = _run(["launch/torchrun.sh", "ddp", CONFIG, "max_steps=2", f"output_dir={tmp_path}"], timeout=150)
    _check_run(proc, tmp_path, engine="ddp")


@pytest.mark.slow
def test_accelerate_ddp_two_ranks(tmp_path):
    # engine is not given: spra_dist must read accelerate's environment and pick DDP over 2 ranks.
    proc = _run(["launch/accelerate.sh", "ddp", CONFIG, "max_steps=2", f"output_dir={tmp_path}"], timeout=150)
    _check_run(proc, tmp_path, engine="ddp")
