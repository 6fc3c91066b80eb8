"""This process's memory as Linux reports it, for the benchmarks that run each arm in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so a later peak is measured apart from what came before."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_fresh(cmd: list[str], **env: str) -> dict:
    """Run one arm's ``cmd`` in a fresh process (its own peak RSS), offline, with ``env`` added; its last stdout line
    as JSON, plus the machine's load average before it started."""
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **env),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load_before}
