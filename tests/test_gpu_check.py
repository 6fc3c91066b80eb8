"""make gpu-check (bench/gpu_check.py) without a GPU: it skips cleanly; its parts' plumbing and its report, fed by
the benchmark's own functions run on the CPU."""

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from bench import gpu_bench, gpu_check, gpu_report

pytestmark = pytest.mark.slow  # processes and the benchmark's functions

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks-gpu.md"


def test_skips_cleanly_without_cuda():
    before = DOC.stat().st_mtime_ns if DOC.exists() else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [proc.stdout.strip()]  # one line
    assert proc.stdout.startswith("gpu-check: skipped: no CUDA device") and "nothing written" in proc.stdout
    assert (DOC.stat().st_mtime_ns if DOC.exists() else None) == before


def test_part_over_its_limit_is_killed_with_its_children():
    script = ("import json, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(json.dumps({'child': child.pid}), flush=True)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    part = gpu_check.run_part("demo", [sys.executable, "-c", script], limit_s=3)
    assert time.monotonic() - start < 30
    assert part.timed_out and not part.ok and part.records  # what it printed before the limit is kept
    grandchild = part.records[0]["child"]
    for _ in range(50):  # reparented and reaped once its parent is gone
        if not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {grandchild} of the killed part still runs")


def test_report_from_the_benchmark_functions_on_cpu(monkeypatch):
    monkeypatch.setenv("SPRA_SDDMM", "auto")  # the benchmark sets it per run: restored afterwards
    records = [{"sddmm": gpu_bench.sddmm_times((32, 48), tokens=16, device="cpu", reps=1,
                                               backends=("sampled_addmm",))}]
    for method in ("spra_sampled_addmm", "floor"):
        step = gpu_bench.step_times(method, device="cpu", layers=1, batch=1, seq=8, steps=2, warmup=0)
        records.append({"step": {**step, "round": 0}})
    assert records[1]["step"]["trainable"] == 8 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert records[2]["step"]["trainable"] == 0
    fsdp2 = {"backend": "nccl", "device": "cuda", "world_size": 1, "steps": 8, "losses": [5.6, 4.1], "seconds": 1.5,
             "sharded": "DTensor", "values_device": "cuda:0", "k_total": 17408, "adapter_roundtrip": True, "ok": True}
    lim = gpu_check.LIMITS
    parts = [SimpleNamespace(name="tests", ok=True, timed_out=False, returncode=0, seconds=40.0, limit_s=lim["tests"],
                             output="....\n12 passed in 30.1s\n", records=[]),
             SimpleNamespace(name="bench", ok=True, timed_out=False, returncode=0, seconds=90.0, limit_s=lim["bench"],
                             output="", records=records),
             SimpleNamespace(name="fsdp2", ok=False, timed_out=True, returncode=-9, seconds=60.0, limit_s=60,
                             output="started\n", records=[{"fsdp2": fsdp2}])]
    page = gpu_report.render({"gpu": "NVIDIA H200", "when": "today"}, parts, batch=1, seq=8, layers=1,
                             limits=gpu_check.LIMITS)
    assert f"| tests | ok | 40 | {gpu_check.LIMITS['tests']} |" in page and "| fsdp2 | out of time | 60 | 60 |" in page
    assert "`12 passed in 30.1s`" in page
    assert "| 32 × 48, 640 |  | " in page  # Triton not timed on the CPU: an empty cell
    assert "| spra_dist, sampled_addmm | 81,408 |" in page and "| floor (all frozen) | 0 |" in page
    assert "loss 5.600 → 4.100" in page and "```\nstarted\n```" in page
