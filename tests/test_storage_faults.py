"""Storage faults: a kill during a checkpoint write, a full disk, a file-size limit, a damaged file, a repeated
command, a resume that would change or replace a run. The previous complete state always survives, resumable, and
errors are one line naming the file or the setting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama
from tiny_run import STEPS, train_argv
from tree import tree_hash

from spra_dist import SpraConfig, apply_spra, load_adapter, save_adapter
from spra_dist.cli import EXIT_STORAGE, main
from spra_dist.train.checkpoint import find_latest, read_checkpoint, resolve_resume

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "train" / "debug_tiny_llama.yaml"

_ENGINE = """
import torch
torch.set_num_threads(1)  # writers are forked from this process: no thread pool may be running
from tiny_models import tiny_llama
from tiny_run import STEPS, train_argv
from spra_dist import SpraConfig, apply_spra
from spra_dist.distributed.parallelize import parallelize
from spra_dist.core.model import trainable_parameters

model = apply_spra(tiny_llama(), SpraConfig(seed=5))
engine = parallelize(model, engine="none", mixed_precision="no",
                     make_optimizer=lambda m: torch.optim.AdamW([p for _, p in trainable_parameters(m)]),
                     make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))


def fill(value):
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.fill_(float(value))
"""

_CHECKPOINT_KILLER = _ENGINE + """
import json, os, random, signal, time, warnings
from spra_dist.train.checkpoint import find_latest, save_checkpoint

out, rng = {out!r}, random.Random(7)
fill(1)
save_checkpoint(engine, out, step=1, mask_seed=5, keep=2)
latest = 1
for trial in range({trials}):
    pid = os.fork()
    if pid == 0:  # the writer: one checkpoint per step, each step's values equal to the step, until killed
        step = latest
        while True:
            step += 1
            fill(step)
            save_checkpoint(engine, out, step=step, mask_seed=5, keep=2)
    time.sleep(rng.uniform(0.0, 0.2))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a step the kill left unfinished is skipped with a warning
        ckpt = find_latest(out)
    values = {{float(t.unique().item()) for name, t in ckpt.tensors.items() if "::" not in name and "rng" not in name}}
    assert values == {{float(ckpt.step)}}, (ckpt.step, values)
    latest = ckpt.step
    print(json.dumps(ckpt.step), flush=True)
"""


def run_script(source: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "script.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=cwd)


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_the_previous_one_resumable(tmp_path):
    out = tmp_path / "run"
    proc = run_script(_CHECKPOINT_KILLER.format(out=str(out), trials=20), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(steps) == 20 and steps[-1] > 2  # 20 kills, and the writers made progress between them
    ckpt = find_latest(out)
    model = apply_spra(tiny_llama(), SpraConfig(seed=5))
    from spra_dist.train.checkpoint import load_values

    load_values(model, ckpt)  # resumable: the values load into a fresh model
    assert all(torch.all(p == ckpt.step) for p in model.parameters() if p.requires_grad)


_FILE_SIZE_LIMIT = _ENGINE + """
import resource, signal
from spra_dist import save_adapter
from spra_dist.train.checkpoint import save_checkpoint

fill(1)
save_checkpoint(engine, "run", step=1, mask_seed=5)
save_adapter(model, "run/adapter")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
fill(2)
for write in (lambda: save_checkpoint(engine, "run", step=2, mask_seed=5), lambda: save_adapter(model, "run/adapter")):
    try:
        write()
    except OSError as err:
        print(err)
"""


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".spra-*"))


@pytest.mark.slow
def test_file_size_limit_keeps_the_last_good_state(tmp_path):
    proc = run_script(_FILE_SIZE_LIMIT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = proc.stdout.strip().splitlines()
    assert len(errors) == 2 and all("File too large; free space" in e for e in errors)
    assert "state.safetensors" in errors[0] and "adapter.safetensors" in errors[1]
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]  # no partial step 2
    assert leftovers(run) == []
    assert read_checkpoint(run / "checkpoints" / "step-00000001").step == 1
    loaded = load_adapter(tiny_llama(), run / "adapter")
    assert all(torch.all(p == 1.0) for p in loaded.parameters() if p.requires_grad)  # the old adapter


@pytest.fixture
def small_disk(tmp_path):
    """A 900 KiB tmpfs: the base model (464 KB) and one checkpoint (219 KB) fit, a second checkpoint doesn't."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); the file-size-limit test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(small_disk):
    out = small_disk / "run"
    proc = subprocess.run([sys.executable, "-m", "spra_dist", "train", "--config", str(DEBUG), f"output_dir={out}",
                           "max_steps=4", "checkpoint_every=1", "eval_size=16"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == EXIT_STORAGE, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "No space left on device" in last and "resume=auto" in last
    assert "Traceback" not in proc.stderr
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-00000001"] and leftovers(out) == []
    assert read_checkpoint(out / "checkpoints" / "step-00000001").step == 1


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_bit_flipped_adapter_is_refused_by_name(tmp_path, capsys):
    model = apply_spra(tiny_llama(), SpraConfig(seed=1))
    save_adapter(model, tmp_path / "a")
    flip_a_byte(tmp_path / "a" / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"a/adapter.safetensors does not match the sha256"):
        load_adapter(tiny_llama(), tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a")]) == 2
    assert "adapter.safetensors does not match the sha256" in capsys.readouterr().err


def test_bit_flipped_checkpoint_is_refused_and_auto_resume_skips_it(tiny_run_copy):
    run, last = tiny_run_copy, f"step-{STEPS:08d}"  # the shared run keeps a checkpoint of every step
    flip_a_byte(run / "checkpoints" / last / "state.safetensors")
    with pytest.raises(ValueError, match=rf"{last}/state.safetensors does not match the sha256"):
        resolve_resume(str(run / "checkpoints" / last), run)
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*{last}"):
        assert resolve_resume("auto", run).step == STEPS - 1  # the newest one that verifies


def test_a_repeated_run_does_not_overwrite_the_adapter(tiny_run_copy, capsys):
    before = tree_hash(tiny_run_copy)
    assert main(train_argv(tiny_run_copy)) == 2
    err = capsys.readouterr().err
    assert "already holds the adapter of an earlier run" in err and "overwrite=true" in err
    assert tree_hash(tiny_run_copy) == before


def test_resume_without_a_checkpoint_refuses_a_finished_adapter(tiny_run_copy, capsys):
    run = tiny_run_copy
    shutil.rmtree(run / "checkpoints")  # checkpoint_every=0, the default, leaves none
    before = tree_hash(run)
    assert main(train_argv(run, steps=2, extra=("resume=auto", "lr=0.5"))) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "no checkpoint" in err and "overwrite=true" in err, err
    assert tree_hash(run) == before


@pytest.mark.slow
def test_resume_without_a_checkpoint_or_an_adapter_starts_fresh(tmp_path):
    run = tmp_path / "run"
    assert main(train_argv(run, steps=1, extra=("resume=auto",))) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] is None and summary["steps"] == 1


def test_resume_with_other_settings_is_refused_naming_each(tiny_run_copy, capsys):
    run = tiny_run_copy
    before = tree_hash(run)
    argv = train_argv(run, extra=("resume=auto", "lr=0.5", "schedule=linear", "seed=7", "spra.lora_rank=4",
                                  "data.train_size=256", "engine=none", "log_every=1"))  # the last two may change
    assert main(argv) == 2
    err = capsys.readouterr().err
    for changed in ("lr=0.5 (checkpoint: 0.03)", "schedule=linear (checkpoint: cosine)", "seed=7 (checkpoint: 0)",
                    "spra.lora_rank=4 (checkpoint: 8)", "data.train_size=256 (checkpoint: 512)"):
        assert changed in err, (changed, err)
    assert "engine" not in err.split("settings:")[1] and "log_every" not in err
    assert main(train_argv(run, steps=2, extra=("resume=auto",))) == 2  # max_steps below the checkpoint's
    assert "max_steps=2 (the checkpoint's run: 6, checkpoint at step 6" in capsys.readouterr().err
    assert tree_hash(run) == before


def test_resume_of_a_finished_run_changes_nothing(tiny_run_copy, capsys):
    run = tiny_run_copy
    before = tree_hash(run)
    assert main(train_argv(run, extra=("resume=auto",))) == 0
    assert f"the run finished at step {STEPS}; nothing changed" in capsys.readouterr().out
    assert tree_hash(run) == before
    # An adapter of an earlier step (a later job was preempted after its last checkpoint) is not a finished run.
    from spra_dist.train.config import load_config
    from spra_dist.train.resume import check_resume

    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "steps": STEPS - 2}))
    argv = train_argv(run, extra=("resume=auto",))
    assert not check_resume(load_config(argv[2], argv[3:]), find_latest(run), run).finished


@pytest.mark.slow
def test_resume_extends_max_steps_and_metrics_never_step_back(tiny_run_copy, capsys, monkeypatch):
    """Resumed from step 3 of the 6-step run: the lines of steps 4..6 move to metrics.superseded.jsonl, and the
    log and the plot go 0 .. 3, then on to the new max_steps."""
    from spra_dist.train import recipe

    run, resumed = tiny_run_copy, 3
    for later in range(resumed + 1, STEPS + 1):
        shutil.rmtree(run / "checkpoints" / f"step-{later:08d}")
    plotted = []
    monkeypatch.setattr(recipe, "plot_loss", lambda records, *a, **kw: plotted.extend(records))
    old = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert main(train_argv(run, steps=STEPS + 2, extra=("resume=auto",))) == 0
    out = capsys.readouterr().out
    assert f"extending the run in {run} from max_steps={STEPS} to {STEPS + 2} (resuming at step {resumed}" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == STEPS + 2, steps
    assert [r["step"] for r in plotted] == steps
    superseded = [json.loads(line) for line in (run / "metrics.superseded.jsonl").read_text().splitlines()]
    assert superseded == [r for r in old if r["step"] > resumed] and superseded


@pytest.mark.slow
def test_overwrite_and_resume_are_allowed(tiny_run_copy):
    run = tiny_run_copy
    assert main(train_argv(run, steps=STEPS + 1, extra=("resume=auto",))) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == STEPS
    assert main(train_argv(run, steps=2, extra=("overwrite=true",))) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
