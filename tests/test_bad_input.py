"""A matrix of bad inputs across config files, overrides, CLI flags, launcher arguments, adapter directories,
checkpoints and data. Each gets one ``error: ...`` line naming the value and the fix, exit status 2, no
traceback, and no output directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_llama

from spra_dist import SpraConfig, apply_spra, save_adapter
from spra_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "train" / "debug_tiny_llama.yaml")

# (id, overrides for `spra train --config DEBUG output_dir=<tmp>/out ...`, words the error must hold)
TRAIN_OVERRIDES = [
    ("typo", ["lora_rnak=4"], ["'lora_rnak'", "did you mean 'lora_rank'"]),
    ("short-name typo", ["lerning_rate=1e-3"], ["'lerning_rate'", "did you mean 'lr'"]),
    ("other tool's name", ["gradient_accumulation_steps=2"], ["did you mean 'grad_accum'"]),
    ("not key=value", ["max_steps"], ["'max_steps' is not key=value", "lr=3e-4"]),
    ("empty key", ["=3"], ["'=3' is not key=value"]),
    ("ambiguous bare key", ["source=x"], ["'source' is ambiguous", "model.source, data.source"]),
    ("bad YAML value", ["lr=[1,"], ["value '[1,' is not valid YAML"]),
    ("wrong type", ["max_steps=many"], ["max_steps='many' has the wrong type", "expected int"]),
    ("zero steps", ["max_steps=0"], ["max_steps=0 must be a positive integer"]),
    ("negative lr", ["lr=-1"], ["learning rates must be > 0"]),
    ("batch vs accumulation", ["batch_size=10", "grad_accum=3"], ["batch_size=10 is not divisible by grad_accum=3"]),
    ("unknown engine", ["engine=tpu"], ["engine='tpu' is not one of"]),
    ("fp8", ["mixed_precision=fp8"], ["mixed_precision='fp8' is not one of"]),
    ("unknown model source", ["model.source=gpt5"], ["model.source='gpt5' is not one of"]),
    ("density above 1", ["density=2"], ["density must be in (0, 1]"]),
    ("both budgets", ["lora_rank=8", "density=0.1"], ["set exactly one of lora_rank and density"]),
    ("stop_after past the end", ["stop_after=1000"], ["stop_after=1000 must lie in 1..max_steps"]),
    ("hf without a path", ["model.source=hf"], ["model.source=hf needs model.name_or_path"]),
    ("hf path without a model", ["model.source=hf", "model.name_or_path=/no/such/model"],
     ["model.name_or_path='/no/such/model' does not exist"]),
    ("encoder for causal LM", ["model.source=tiny_bert"], ["model.source=tiny_bert is an encoder"]),
    ("one class", ["model.source=tiny_bert", "task=classification", "num_labels=1"], ["model.num_labels=1"]),
    ("negative seed", ["seed=-1"], ["seed=-1 must be a non-negative integer"]),
    ("negative mask seed", ["spra.seed=-1"], ["seed must be a non-negative integer or null, got -1"]),
    ("targets match nothing", ["spra.target_modules=[nope]"], ["target_modules=['nope'] matched no linear layer"]),
    ("dense module missing", ["spra.trainable_modules=[head]"], ["trainable_modules ['head'] matched no module"]),
    ("unknown DeepSpeed preset", ["engine=deepspeed", "deepspeed_config=zero9"],
     ["deepspeed_config='zero9' not found"]),
    ("negative checkpoint interval", ["checkpoint_every=-1"], ["checkpoint_every=-1 is negative"]),
    ("eval fraction", ["data.eval_fraction=1.5"], ["data.eval_fraction=1.5 must lie in (0, 1)"]),
    ("missing text file", ["data.source=text_file", "data.path=/no/such.txt"],
     ["data.path='/no/such.txt' does not exist"]),
    ("text path is a folder", ["data.source=text_file", "data.path=/"], ["data.path='/' is a directory"]),
    ("no eval data", ["eval_size=0"], ["gave 512 train / 0 eval examples"]),
    ("resume from nothing", ["resume=/no/such/checkpoint"], ["/no/such/checkpoint/trainer_state.json not found"]),
    ("unknown quantize_base", ["quantize_base=nf8"], ["quantize_base='nf8' is not one of", "nf4"]),
    ("NF4 under DeepSpeed", ["quantize_base=nf4", "engine=deepspeed", "deepspeed_config=zero2"],
     ["quantize_base=nf4 runs under engine none, ddp or fsdp2"]),
    ("NF4 of a GPT-2 Conv1D", ["quantize_base=nf4", "model.source=tiny_gpt2"], ["Conv1D", "quantize_base=none"]),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(code: int, err: str, words: list[str]) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize(("overrides", "words"), [c[1:] for c in TRAIN_OVERRIDES], ids=[c[0] for c in TRAIN_OVERRIDES])
def test_bad_training_input(overrides, words, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["train", "--config", DEBUG, f"output_dir={out}", *overrides], capsys)
    assert_one_line(code, err, words)
    assert not out.exists()  # no partial output


CONFIG_FILES = [
    ("missing file", None, ["does not exist", "pass --config"]),
    ("not a mapping", "- a\n- b\n", ["must hold a mapping"]),
    ("YAML syntax", "max_steps: 3\n  lr: [\n", ["is not valid YAML at line", "fix the file's syntax"]),
    ("unknown key", "lerning_rate: 0.1\n", ["'lerning_rate'", "did you mean 'lr'"]),
    ("section not a mapping", "model: 3\n", ["section 'model' must be a mapping"]),
    ("wrong type", "max_steps: [1]\n", ["max_steps=[1] has the wrong type"]),
]


@pytest.mark.parametrize(("text", "words"), [c[1:] for c in CONFIG_FILES], ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file(text, words, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    out = tmp_path / "out"
    code, err = run_cli(["train", "--config", str(path), f"output_dir={out}"], capsys)
    assert_one_line(code, err, words)
    assert not out.exists()


CLI_FLAGS = [
    ("no command", [], ["arguments are required: command", "see spra --help"]),
    ("unknown command", ["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ("train without --config", ["train"], ["required: --config", "see spra train --help"]),
    ("merge without --out", ["merge", "--adapter", "x"], ["required: --out", "see spra merge --help"]),
    ("unknown flag", ["inspect", "x", "--verbose"], ["unrecognized arguments: --verbose"]),
]


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CLI_FLAGS], ids=[c[0] for c in CLI_FLAGS])
def test_bad_cli_flags(argv, words, capsys):
    assert_one_line(*run_cli(argv, capsys), words)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(apply_spra(tiny_llama(), SpraConfig(seed=1)), path)
    return path


def _damage(adapter: Path, target: Path, how: str) -> None:
    import shutil

    shutil.copytree(adapter, target)
    weights, config = target / "adapter.safetensors", target / "adapter_config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "bit flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x10
        weights.write_bytes(bytes(data))
    elif how == "config not JSON":
        config.write_text("{not json")
    elif how == "a PEFT adapter":
        config.write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    elif how == "no weights":
        weights.unlink()
    elif how == "future mask version":
        config.write_text(json.dumps({**json.loads(config.read_text()), "mask_version": 99}))


ADAPTERS = [
    ("truncated", ["adapter.safetensors does not match the sha256"]),
    ("bit flip", ["adapter.safetensors does not match the sha256"]),
    ("config not JSON", ["adapter_config.json is not valid JSON"]),
    ("a PEFT adapter", ["adapter_config.json is not a spra_dist adapter"]),
    ("no weights", ["adapter.safetensors not found"]),
    ("future mask version", ["unknown mask_version 99", "upgrade spra_dist"]),
]


@pytest.mark.parametrize(("how", "words"), ADAPTERS, ids=[c[0] for c in ADAPTERS])
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_bad_adapter_directory(command, how, words, adapter, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    _damage(adapter, damaged, how)
    argv = ["inspect", str(damaged)] if command == "inspect" else \
        ["merge", "--adapter", str(damaged), "--out", str(tmp_path / "merged")]
    assert_one_line(*run_cli(argv, capsys), words)
    assert not (tmp_path / "merged").exists()


def test_merge_out_is_a_file(adapter, tmp_path, capsys):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)  # the adapter's own base (same seed): only --out is wrong below
    capsys.readouterr()  # save_pretrained's progress bar is not the command's output
    out = tmp_path / "file"
    out.write_text("x")
    merge = ["merge", "--adapter", str(adapter), "--base", str(base), "--out"]
    assert_one_line(*run_cli([*merge, str(out)], capsys),
                    [f"--out {out} exists and is not a directory", "choose another output path"])
    assert out.read_text() == "x"
    code, err = run_cli([*merge, str(tmp_path / "merged")], capsys)  # the same command into a directory merges
    assert code == 0, err


def test_resume_from_a_damaged_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"format": "spra_dist.checkpoint", "step": 1,
                                                         "sha256": "0" * 64}))
    (ckpt / "state.safetensors").write_bytes(b"garbage")
    out = tmp_path / "out"
    code, err = run_cli(["train", "--config", DEBUG, f"output_dir={out}", f"resume={ckpt}"], capsys)
    assert_one_line(code, err, ["step-00000001/state.safetensors does not match the sha256"])
    assert not out.exists()


LAUNCHERS = [
    ("torchrun.sh", ["tpu", DEBUG], ["ENGINE=tpu is not one of"]),
    ("accelerate.sh", ["fsdp2", "missing.yaml"], ["CONFIG missing.yaml not found"]),
    ("deepspeed.sh", [], ["usage: launch/deepspeed.sh"]),
    ("torchrun.sh", ["ddp"], ["usage: launch/torchrun.sh"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "words"), LAUNCHERS, ids=[f"{c[0]} {c[1][:1]}" for c in LAUNCHERS])
def test_bad_launcher_arguments(script, args, words, tmp_path):
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert_one_line(proc.returncode, proc.stderr, words)
    assert list(tmp_path.iterdir()) == []
