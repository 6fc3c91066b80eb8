"""The launch/ wrappers: shell syntax and argument errors. Each wrapper's real 2-rank run is in docs/scale-out.md,
which tests/test_docs.py runs as written (torchrun with FSDP2, accelerate with ZeRO-3, DeepSpeed's launcher with
ZeRO-1), checking the world size, the engine and a clean exit.

    HF_HUB_OFFLINE=1 python -m pytest -q tests/test_launchers.py
"""

from __future__ import annotations

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
