"""Nothing a user saved is lost: writers replace only their own files, a crash leaves a complete old or new
set, ``spra merge`` refuses outputs over a run and bases that are not the adapter's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert, tiny_llama
from tree import tree_hash

from spra_dist import SpraConfig, apply_spra, load_adapter, save_adapter
from spra_dist.adapters.files import read_adapter
from spra_dist.cli import main
from spra_dist.train.checkpoint import save_checkpoint
from spra_dist.utils.atomic import COMMITTED, atomic_files, committed_file

ROOT = Path(__file__).resolve().parents[1]


def adapted(seed: int, fill: float, model=None, **spra):
    model = apply_spra(model or tiny_llama(), SpraConfig(seed=seed, **spra))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(fill)
    return model


def test_save_adapter_keeps_foreign_files(tmp_path):
    target = tmp_path / "my_run"
    (target / "logs").mkdir(parents=True)
    (target / "train_log.txt").write_text("epoch 1: loss 2.3\n")
    (target / "logs" / "events.bin").write_bytes(b"\x00\x01")
    before = {p: p.read_bytes() for p in (target / "train_log.txt", target / "logs" / "events.bin")}
    save_adapter(adapted(1, 0.5), target)
    save_adapter(adapted(1, 0.25), target)  # a second save replaces only the adapter's two files
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in target.iterdir()) == ["adapter.safetensors", "adapter_config.json", "logs",
                                                        "train_log.txt"]
    _, tensors = read_adapter(target)
    assert all(torch.all(v == 0.25) for v in tensors.values())


def test_reader_refuses_a_mixed_pair(tmp_path):
    save_adapter(adapted(1, 0.5), tmp_path / "a")
    save_adapter(adapted(1, 0.25), tmp_path / "b")
    shutil.copy(tmp_path / "b" / "adapter_config.json", tmp_path / "a" / "adapter_config.json")
    with pytest.raises(ValueError, match=r"a/adapter.safetensors does not match the sha256 that "
                                         r"adapter_config.json records.*come from different saves"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_a_committed_set_wins_and_is_finished_by_the_next_writer(tmp_path):
    """The state a kill leaves between the commit rename and the last move: readers see the new set."""
    target = tmp_path / "d"
    with atomic_files(target) as tmp:
        (tmp / "data.bin").write_bytes(b"old")
        (tmp / "meta.json").write_text("old")
    commit = target / f"{COMMITTED}00000000000000000001-x"
    commit.mkdir()
    (commit / "meta.json").write_text("new")  # data.bin was already moved: the in-place copy is the new one
    (target / "data.bin").write_bytes(b"new")
    assert committed_file(target, "meta.json").read_text() == "new"
    assert committed_file(target, "data.bin").read_bytes() == b"new"
    with atomic_files(target) as tmp:
        (tmp / "other.txt").write_text("x")
    assert (target / "meta.json").read_text() == "new" and not commit.exists()


_KILLER = """
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)  # the writers are forked: no thread pool may be running in this process
sys.path.insert(0, {tests!r})
from tiny_models import tiny_llama
from spra_dist import SpraConfig, apply_spra, load_adapter, save_adapter
from spra_dist.adapters.files import read_adapter

target, rng, models = {target!r}, random.Random(13), []
for fill in (1.0, 2.0):
    m = apply_spra(tiny_llama(), SpraConfig(seed=5))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.fill_(fill)
    models.append(m)
save_adapter(models[0], target)
for trial in range({trials}):
    pid = os.fork()
    if pid == 0:  # the writer: saves the two adapters in turn until it is killed
        i = trial
        while True:
            i += 1
            save_adapter(models[i % 2], target)
    time.sleep(rng.uniform(0.0, 0.2))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    left = sorted({{p.name[:13] for p in os.scandir(target) if p.name.startswith(".spra-")}})
    config, tensors = read_adapter(target)  # complete and checksummed, or this raises
    fills = sorted({{float(v.unique().item()) for v in tensors.values()}})
    loaded = load_adapter(tiny_llama(), target)
    assert all(torch.all(p == fills[0]) for p in loaded.parameters() if p.requires_grad)
    print(json.dumps([fills, left]), flush=True)
"""


@pytest.mark.slow
def test_kill_during_save_adapter_leaves_a_complete_adapter(tmp_path):
    """20 writers killed (SIGKILL) at random points of a save loop: each time, a complete old or new adapter."""
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    script = tmp_path / "killer.py"
    script.write_text(_KILLER.format(tests=str(ROOT / "tests"), target=str(target), trials=20))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == 20
    assert all(fills in ([1.0], [2.0]) for fills, _ in results)  # all of the old set or all of the new one
    assert {fills[0] for fills, _ in results} == {1.0, 2.0}  # the kills landed on both sides of a save
    assert any(left for _, left in results)  # and some inside a save, leaving its unfinished folder behind
    assert (target / "notes.txt").read_text() == "mine"
    read_adapter(target)  # and this process reads it too


def test_checkpoint_rotation_removes_only_checkpoint_files(tmp_path):
    from spra_dist.core.model import trainable_parameters
    from spra_dist.distributed.parallelize import parallelize

    model = adapted(1, 0.0)
    engine = parallelize(model, engine="none", mixed_precision="no",
                         make_optimizer=lambda m: torch.optim.AdamW([p for _, p in trainable_parameters(m)]),
                         make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
    save_checkpoint(engine, tmp_path, step=1, mask_seed=1, keep=1)
    (tmp_path / "checkpoints" / "step-00000001" / "note.txt").write_text("keep me")
    save_checkpoint(engine, tmp_path, step=2, mask_seed=1, keep=1)
    save_checkpoint(engine, tmp_path, step=3, mask_seed=1, keep=1)
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step-00000001", "step-00000003"]  # step 2 removed whole; step 1 keeps the user's note
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step-00000001").iterdir()) == ["note.txt"]


# ---- spra merge -----------------------------------------------------------------------------------------------


@pytest.fixture
def run(tiny_run) -> Path:
    """A run directory as ``spra train`` leaves it: adapter/, base_model/, config.yaml, summary.json (the shared
    one of tests/conftest.py: merge must leave it as it was)."""
    return tiny_run


def merge(argv: list[str], capsys) -> tuple[int, str]:
    code = main(["merge", *argv])
    return code, capsys.readouterr().err


def test_merge_keeps_foreign_files_and_refuses_to_replace_a_model(run, tmp_path, capsys):
    out = tmp_path / "somedir"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert merge(["--adapter", str(run / "adapter"), "--out", str(out)], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "model.safetensors").is_file()
    before = tree_hash(out)
    code, err = merge(["--adapter", str(run / "adapter"), "--out", str(out)], capsys)
    assert code == 2 and "already holds config.json" in err and "--overwrite" in err
    assert tree_hash(out) == before
    assert merge(["--adapter", str(run / "adapter"), "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "my notes"
    assert not [p for p in out.iterdir() if p.name.startswith(".spra-")]


@pytest.mark.parametrize("held", [["config.json"], ["model-00001-of-00002.safetensors", "notes.txt"],
                                  ["tokenizer.json"]])
def test_merge_refuses_a_model_in_out_before_loading_or_writing(run, tmp_path, capsys, monkeypatch, held):
    """An --out holding a model's (or tokenizer's) files is refused before the base is loaded and before any
    folder is made: the refusal costs no time, and not a byte is written."""
    import spra_dist.adapters.export as export

    def never(*args, **kwargs):
        raise AssertionError("spra merge went on past a refusal it could have made first")

    monkeypatch.setattr(export, "load_base", never)
    monkeypatch.setattr(export, "atomic_files", never)
    out = tmp_path / "merged"
    out.mkdir()
    for name in held:
        (out / name).write_text("an earlier merge")
    before = tree_hash(tmp_path)
    code, err = merge(["--adapter", str(run / "adapter"), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"already holds {held[0]}" in err and "--overwrite" in err
    assert tree_hash(tmp_path) == before  # nothing written, no hidden folder made


def test_merge_refuses_an_out_it_cannot_write_before_loading(run, tmp_path, capsys, monkeypatch):
    """A folder it may not write into (os.access says so even to root, who would pass a chmod) is refused before
    the base is loaded, with exit 74 and the folder named."""
    import spra_dist.adapters.export as export

    def never(*args, **kwargs):
        raise AssertionError("spra merge loaded the base for an output it cannot write")

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(export, "load_base", never)
    monkeypatch.setattr(export.os, "access", lambda path, mode: Path(path) != locked)
    code, err = merge(["--adapter", str(run / "adapter"), "--out", str(locked / "merged")], capsys)
    assert code == 74 and f"cannot write {locked}: Permission denied" in err, err
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("where", ["adapter", "run", "inside_run", "above_run"])
def test_merge_refuses_outputs_over_the_run(run, where, capsys):
    out = {"adapter": run / "adapter", "run": run, "inside_run": run / "merged", "above_run": run.parent}[where]
    before = tree_hash(run.parent)
    code, err = merge(["--adapter", str(run / "adapter"), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "that holds adapter" in err and f"--out {run.parent / 'run-merged'}" in err
    assert tree_hash(run.parent) == before  # nothing created, nothing changed


@pytest.fixture(scope="module")
def bert_adapter(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bert")
    model = tiny_bert()
    model.save_pretrained(root / "base")
    model.config._name_or_path = str(root / "base")
    save_adapter(adapted(2, 0.1, model=model), root / "adapter")
    return root / "adapter"


def test_merge_refuses_another_base(bert_adapter, run, tmp_path, capsys):
    out = tmp_path / "never"
    code, err = merge(["--adapter", str(bert_adapter), "--base", str(run / "base_model"), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"trained on base '{bert_adapter.parent / 'base'}' (BertForSequenceClassification" in err
    assert "model_type is 'llama', not 'bert'" in err and "--base" in err
    assert not out.exists()


def test_merge_refuses_a_base_with_missing_weights(bert_adapter, tmp_path, capsys):
    """Same config, but a weight is absent from the checkpoint: transformers would initialise it at random."""
    base = tmp_path / "damaged"
    shutil.copytree(bert_adapter.parent / "base", base)
    weights = load_file(str(base / "model.safetensors"))
    del weights["bert.encoder.layer.0.attention.self.query.weight"]
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    code, err = merge(["--adapter", str(bert_adapter), "--base", str(base), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "1 weights missing" in err and "bert.encoder.layer.0.attention.self.query.weight" in err
    assert not (tmp_path / "o").exists()


def test_merge_names_the_base_when_its_recorded_path_is_gone(tmp_path, capsys):
    model = tiny_llama()
    model.config._name_or_path = "/no/such/machine/path/llama"
    save_adapter(adapted(3, 0.1, model=model), tmp_path / "adapter")
    code, err = merge(["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "trained on base '/no/such/machine/path/llama', which does not exist on this machine; pass --base" in err


def test_packaged_base_is_recorded_by_name_and_resolved(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from spra_dist.demos.packaged import minilm_dir

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    # MiniLM's classifier is new: it is trained densely, as in the demo, so merge takes it from the adapter
    save_adapter(adapted(4, 0.01, model=model, trainable_modules=["classifier"]), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model"]["name_or_path"] == "minilm"
    assert "site-packages" not in json.dumps(config["base_model"])
    code, err = merge(["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_inspect_and_merge_do_not_import_deepspeed(run, tmp_path):
    code = (f"import sys; from spra_dist.cli import main; "
            f"assert main(['inspect', {str(run / 'adapter')!r}]) == 0; "
            f"assert main(['merge', '--adapter', {str(run / 'adapter')!r}, '--out', {str(tmp_path / 'm')!r}]) == 0; "
            f"print('deepspeed loaded:', 'deepspeed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "deepspeed loaded: False" in proc.stdout and "Setting accelerator" not in proc.stderr
