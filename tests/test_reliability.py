"""Reliability with real 2-rank jobs and real signals: preemption, lost ranks, non-finite steps. Clean exits of
finished jobs: every job here and in tests/test_distributed.py must exit 0, and docs/scale-out.md (run by
tests/test_docs.py) finishes a job through each launcher, among them the two routes where a rank once aborted at
exit; `make stress` repeats every engine x launcher route.

    HF_HUB_OFFLINE=1 python -m pytest -q tests/test_reliability.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import stress
from test_distributed import ENV, ROOT, adapter_rel_diff, run_ok

from spra_dist.train.guard import EXIT_NONFINITE, EXIT_PREEMPTED

pytestmark = pytest.mark.slow
LONG = ("max_steps=30", "lr=1e-2", "max_grad_norm=null", "batch_size=8", "schedule=linear")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    run_ok(reference, "engine=none", *LONG)
    out = tmp_path / "preempted"
    # SIGTERM to torchrun, as a scheduler sends it: torchrun forwards it to both ranks.
    proc = stress.start("fsdp2", "torchrun", out, *LONG)
    stress.wait_for_step(out / "metrics.jsonl", 3, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    print(f"SIGTERM to torchrun -> exit: {seconds:.1f} s")
    assert seconds < 30, seconds  # inside torchrun's 30 s grace period
    assert "stopped at step" in log and "(SIGTERM); checkpoint" in log, log[-3000:]
    assert not any(line.startswith("error:") for line in log.splitlines()), log[-3000:]
    (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
    step = int(ckpt.name.split("-")[1])
    assert 3 <= step < 30
    assert not (out / "adapter").exists()
    summary = run_ok(out, "engine=fsdp2", *LONG, "resume=auto", nproc=2)
    assert summary["resumed_from_step"] == step
    assert adapter_rel_diff(reference, out) < 1e-4


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "one"
    result = stress.signal_rank("zero2", "deepspeed", out, sig=signal.SIGUSR1, rank=1, overrides=LONG)
    log = result["log"]
    print(f"SIGUSR1 to rank 1 only (zero2, deepspeed) -> job ended: {result['seconds']} s, status {result['rc']}")
    assert result["rc"] != 0 and result["seconds"] < 30, (result["rc"], result["seconds"], log[-3000:])
    (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
    step = int(ckpt.name.split("-")[1])
    assert f"stopped at step {step} (SIGUSR1)" in log and f"stopped at step {step} (a signal on another rank)" in log, \
        log[-3000:]


def test_exit_code_of_a_preempted_rank(tmp_path):
    # One process, SIGINT (Ctrl-C): the documented exit status, one checkpoint, no traceback.
    out = tmp_path / "single"
    cmd = [sys.executable, "-m", "spra_dist", "train", "--config", "configs/train/debug_tiny_llama.yaml",
           f"output_dir={out}", "engine=none", "log_every=1", "eval_every=0", *LONG]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stress.wait_for_step(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert "Traceback" not in log and len(list((out / "checkpoints").glob("step-*"))) == 1


def test_preemption_is_one_line_not_an_error_and_resumes(tmp_path, capsys, monkeypatch):
    """In this process: SIGTERM arrives during step 2; the step finishes, a checkpoint is written, and the run ends
    with status 75 and the line that says how to continue (no "error:"); resume=auto then finishes the run."""
    import os

    from tiny_run import train_argv

    from spra_dist.cli import main
    from spra_dist.train import recipe

    real_step = recipe.train_step
    calls = []

    def step_with_a_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the guard's handler notes it; the step goes on
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recipe, "train_step", step_with_a_signal)
    out = tmp_path / "run"
    assert main(train_argv(out, steps=3, extra=("engine=none",))) == EXIT_PREEMPTED
    err = capsys.readouterr().err.strip().splitlines()
    ckpt = out / "checkpoints" / "step-00000002"
    assert err[-1] == f"stopped at step 2 (SIGTERM); checkpoint {ckpt}; rerun with resume=auto", err[-3:]
    assert not any(line.startswith("error:") for line in err)
    monkeypatch.setattr(recipe, "train_step", real_step)
    assert main(train_argv(out, steps=3, extra=("engine=none", "resume=auto"))) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2


def test_lost_rank_advice_matches_what_is_on_disk(tiny_run, tmp_path, monkeypatch):
    """A lost rank's error says resume=auto only when a checkpoint exists, and names its step; else that a
    restart starts over, and how to make the run resumable."""
    from tiny_run import STEPS

    from spra_dist.distributed import faults
    from spra_dist.train.resume import resume_advice

    monkeypatch.setattr(faults.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(faults.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(faults, "_local_lost", lambda: ["rank 1 (pid 4242) is dead"])
    gloo = RuntimeError("Connection closed by peer [127.0.0.1]:29500")

    saved = str(faults.explain(gloo, advice=resume_advice(tiny_run, checkpoint_every=1, max_steps=STEPS)))
    assert f"resume=auto to continue from the checkpoint at step {STEPS}" in saved and "lost: rank 1" in saved
    none = str(faults.explain(gloo, advice=resume_advice(tmp_path, checkpoint_every=0, max_steps=200)))
    assert "resume=auto" not in none, none
    assert "there is no checkpoint" in none and "a restart starts over" in none and "checkpoint_every=20" in none


# make stress --kill runs every engine x launcher route (accelerate included); the suite runs two of them.
@pytest.mark.parametrize("engine, launcher", [("fsdp2", "torchrun"), ("zero2", "deepspeed")])
def test_kill9_of_one_rank_ends_the_job_naming_it(engine, launcher, tmp_path, monkeypatch):
    from spra_dist.distributed.group import free_port

    port = free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))  # the launchers take it; DeepSpeed's buffers' names hold it
    try:
        result = stress.signal_rank(engine, launcher, tmp_path / "out", sig=signal.SIGKILL, rank=1)
        log = result["log"].replace("rank: 1", "rank 1")
        print(f"kill -9 rank 1 ({engine}, {launcher}) -> job ended: {result['seconds']} s, status {result['rc']}")
        assert result["rc"] != 0 and result["seconds"] < 60, (result["rc"], result["seconds"], log[-3000:])
        assert "rank 1" in log, log[-3000:]
        assert _shm_buffers(port) == []  # a killed DeepSpeed job leaves none of its shared memory either
    finally:
        for path in _shm_buffers(port):  # only after a failure: don't fill the RAM
            path.unlink(missing_ok=True)


def test_stopped_rank_is_found_by_the_timeout(tmp_path):
    import os

    import psutil

    proc = stress.start("ddp", "torchrun", tmp_path / "out", "max_steps=2000", "dist_timeout_s=15")
    seconds, ranks = None, {}
    try:
        stress.wait_for_step(tmp_path / "out" / "metrics.jsonl", 2, proc)
        ranks = stress.rank_pids(proc.pid)
        rank0 = psutil.Process(ranks[0])
        sent = time.monotonic()
        os.kill(ranks[1], signal.SIGSTOP)
        # Rank 0 finds the lost rank and leaves; torchrun then gives the stopped rank its own 30 s grace before
        # killing it (measured: the whole job ends ~46 s after the stop), which the suite does not sit through.
        rank0.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        for pid in ranks.values():  # the workers have sessions of their own: killing torchrun's group misses them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate(timeout=60)
    print(f"SIGSTOP rank 1 (dist_timeout_s=15) -> rank 0 left: {seconds:.1f} s")
    assert seconds is not None and 15 <= seconds < 60, (seconds, log[-3000:])
    assert "lost: rank 1" in log, log[-3000:]


def _fault_run(out: Path, rank: int, steps: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_fault_worker.py"), str(rank), steps, f"output_dir={out}", "max_steps=6",
           "batch_size=8", "log_every=1", "eval_every=0", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2"])
def test_nonfinite_on_one_rank_is_skipped_on_every_rank(engine, tmp_path):
    preset = ["engine=deepspeed", "deepspeed_config=zero2"] if engine == "zero2" else [f"engine={engine}"]
    proc = _fault_run(tmp_path, 1, "2", *preset, "on_nonfinite=skip")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nonfinite_skipped_steps"] == 1 and summary["steps"] == 6
    skipped = [r for r in _metrics(tmp_path) if r.get("nonfinite_skipped")]
    assert [r["step"] for r in skipped] == [3]
    from spra_dist.adapters.files import read_adapter

    _, values = read_adapter(tmp_path / "adapter")
    assert all(v.isfinite().all() for v in values.values())


def test_nonfinite_skips_in_a_row_stop_the_run(tmp_path):
    proc = _fault_run(tmp_path, 0, "1,2,3", "engine=ddp", "on_nonfinite=skip", "max_nonfinite_skips=2")
    assert proc.returncode != 0
    assert proc.stderr.count("max_nonfinite_skips=2 reached") == 2, proc.stderr[-4000:]  # both ranks, same step


def test_nonfinite_stop_saves_the_last_good_state(tmp_path):
    proc = _fault_run(tmp_path, 1, "2", "engine=fsdp2")
    assert proc.returncode != 0
    assert proc.stderr.count("non-finite loss or gradients at step 3") == 2, proc.stderr[-4000:]
    assert f"exitcode  : {EXIT_NONFINITE}" in proc.stderr or "exitcode: 3" in proc.stderr.replace("  ", " ")
    assert (tmp_path / "checkpoints" / "step-00000002" / "state.safetensors").is_file()
    assert not (tmp_path / "adapter").exists()


def _shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's CPU allreduce buffers of the job on ``port`` (spra_dist.distributed.deepspeed.SHM_BUFFER)."""
    import os

    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_finished_deepspeed_job_leaves_no_shared_memory(tmp_path, monkeypatch):
    """DeepSpeed's CPU allreduce keeps a 66 MiB buffer per rank in /dev/shm that it never removes: none is left
    after a finished launch/deepspeed.sh job (test_kill9_of_one_rank_ends_the_job_naming_it checks a killed one),
    and the job prints its closing lines once (rank 0 only)."""
    from spra_dist.distributed.group import free_port

    port = free_port()
    try:
        monkeypatch.setenv("MASTER_PORT", str(port))  # deepspeed.sh takes it: the buffers' names hold it
        out = tmp_path / "finished"
        proc = subprocess.run(stress.command("zero2", "deepspeed", out, "max_steps=2", "eval_every=0"), cwd=ROOT,
                              env=stress.env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert _shm_buffers(port) == []
        closing = [line for line in proc.stdout.splitlines() if line.startswith(("perplexity: ", "adapter: "))]
        assert len(closing) == 2 and closing[1] == f"adapter: {out / 'adapter'}", proc.stdout[-3000:]
    finally:
        for path in _shm_buffers(port):  # only after a failure: don't fill the RAM
            path.unlink(missing_ok=True)
