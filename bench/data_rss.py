"""Peak memory of preparing a large JSONL: `spra preprocess` (tokenise + Arrow cache) against the file's size.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/data_rss.py --size-gb 1.0     # writes ~1 GB in a temp dir

Writes a JSONL of ``{"text": ...}`` rows (about 1 KB each, fixed seed) into a temporary directory, runs
``spra preprocess`` on it with the SmolLM2 tokenizer (type text), and reports the child process's peak RSS
next to the same command on a 1 MB file (the imports' baseline), split into heap (RssAnon) and memory-mapped
file pages (RssFile, sampled from /proc), the file size, the cache's size on disk and the wall time.
Everything is deleted afterwards; nothing is committed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

WORDS = ("the a of to and in is was for on that with as by at from it his her an be this are which or had not "
         "but one all were they been have their has more when who will there no if out so said what up its about "
         "into than them can only other new some time could these two may first then do any like my now over "
         "such our man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last").split()


def write_jsonl(path: Path, size: int, *, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)
    written, rows = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            block = []
            for _ in range(1000):
                text = " ".join(vocab[rng.integers(0, len(vocab), size=int(rng.integers(120, 220)))])
                block.append(json.dumps({"text": f"{rows} {text}."}) + "\n")
                rows += 1
            chunk = "".join(block)
            f.write(chunk)
            written += len(chunk.encode())
    return rows


def preprocess(folder: Path, data: Path, processes: int) -> dict:
    cfg = folder / f"{data.stem}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"source": "smollm2", "task": "causal_lm"},
        "data": {"datasets": [{"path": str(data), "type": "text"}], "val_set_size": 100, "max_length": 4096,
                 "dataset_processes": processes, "dataset_prepared_path": str(folder / f"cache-{data.stem}")}}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "spra_dist", "preprocess", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    peaks = {"RssAnon": 0, "RssFile": 0}
    watcher = threading.Thread(target=_watch, args=(proc, peaks), daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(err[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    cache = folder / f"cache-{data.stem}"
    disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and "hf" not in p.relative_to(cache).parts)
    return {"peak_rss_mb": round(peak / 1024, 1), "grew": peak > before, "wall_s": round(wall, 1),
            "peak_anon_mb": round(peaks["RssAnon"] / 1024, 1), "peak_file_mb": round(peaks["RssFile"] / 1024, 1),
            "cache_mb": round(disk / 2**20, 1), "stdout": out.strip().splitlines()}


def _watch(proc: subprocess.Popen, peaks: dict) -> None:
    """Sample /proc/PID/status: the heap (RssAnon) apart from memory-mapped file pages (RssFile), which count in
    RSS but are the page cache's to drop (the Arrow files read through mmap)."""
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--processes", type=int, default=1, help="data.dataset_processes")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="spra_data_rss_"))
    try:
        small, large = folder / "small.jsonl", folder / "large.jsonl"
        write_jsonl(small, 1 << 20)
        started = time.perf_counter()
        rows = write_jsonl(large, int(args.size_gb * 2**30))
        print(f"wrote {large.stat().st_size / 2**30:.2f} GiB, {rows:,} rows in {time.perf_counter() - started:.0f} s",
              flush=True)
        base = preprocess(folder, small, args.processes)  # run first: RUSAGE_CHILDREN keeps the maximum
        big = preprocess(folder, large, args.processes)
        size_mb = large.stat().st_size / 2**20
        result = {"file_mb": round(size_mb, 1), "rows": rows, "processes": args.processes,
                  "baseline_peak_rss_mb": base["peak_rss_mb"], "peak_rss_mb": big["peak_rss_mb"],
                  "rss_over_file": round(big["peak_rss_mb"] / size_mb, 3),
                  "rss_above_baseline_mb": round(big["peak_rss_mb"] - base["peak_rss_mb"], 1),
                  "baseline_peak_anon_mb": base["peak_anon_mb"], "peak_anon_mb": big["peak_anon_mb"],
                  "peak_file_backed_mb": big["peak_file_mb"],
                  "cache_mb": big["cache_mb"], "wall_s": big["wall_s"], "preprocess": big["stdout"]}
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
