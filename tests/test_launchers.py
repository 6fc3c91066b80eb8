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


FAKE_DEEPSPEED = """#!/usr/bin/env bash
# Stands in for DeepSpeed's launcher: makes the CPU allreduce buffers of this job's two ranks, then ends as told.
while [ $# -gt 0 ]; do [ "$1" = --master_port ] && port="$2"; shift; done
for rank in 0 1; do : > "/dev/shm/deepspeed_allreduce_buffer_$(id -u)_127.0.0.1_${port}_$rank"; done
echo started
[ "$END" = exit ] && exit 7
exec sleep 60
"""


@pytest.mark.slow
@pytest.mark.parametrize("end", ["exit", "sigterm"])
def test_deepspeed_wrapper_removes_its_jobs_shared_memory(end, tmp_path):
    """After DeepSpeed's launcher ends (a rank failed: exit 7; or the wrapper got SIGTERM, which it passes on),
    launch/deepspeed.sh removes the /dev/shm buffers of its own job's port, keeps other jobs', and exits with the
    launcher's status."""
    import signal

    from spra_dist.distributed.group import free_port

    (tmp_path / "deepspeed").write_text(FAKE_DEEPSPEED)
    (tmp_path / "deepspeed").chmod(0o755)
    port = free_port()
    shm = Path("/dev/shm")
    mine = [shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for rank in (0, 1)]
    # Another job's buffers, one on a port that ends in this one's digits.
    others = [shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1{port}_0",
              shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.2_{port + 1}_1"]
    env = _env(MASTER_PORT=str(port), END=end)
    env["PATH"] = os.pathsep.join([str(tmp_path), env["PATH"]])
    env["VIRTUAL_ENV"] = str(tmp_path)  # an active environment: the wrapper then keeps PATH, stand-in first
    try:
        for path in others:
            path.touch()
        proc = subprocess.Popen(["launch/deepspeed.sh", "zero2", CONFIG], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "started\n"
        assert all(path.exists() for path in mine)
        if end == "sigterm":
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == (7 if end == "exit" else 128 + signal.SIGTERM), err
        assert not any(path.exists() for path in mine)
        assert all(path.exists() for path in others)
    finally:
        for path in mine + others:
            path.unlink(missing_ok=True)
