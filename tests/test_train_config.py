"""Training config: YAML + overrides, key resolution, type checks; batch order and schedule."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

import spra_dist
from spra_dist.data import config as data_config
from spra_dist.data.tokens import global_batch, rank_slice, split_micro
from spra_dist.distributed import devices, engines
from spra_dist.train import schema, trackers
from spra_dist.train.config import TrainConfig, load_config, parse_override, resolve_key
from spra_dist.train.loop import lr_factor
from spra_dist.train.schema import from_dict, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_sections_and_defaults(tmp_path):
    path = write(tmp_path, "max_steps: 7\nmodel:\n  source: tiny_gpt2\ndata:\n  max_length: 32\n"
                           "spra:\n  lora_rank: 4\n  trainable_modules: [score]\n")
    cfg = load_config(path)
    assert cfg.max_steps == 7
    assert cfg.model.source == "tiny_gpt2"
    assert cfg.data.max_length == 32
    assert cfg.spra.lora_rank == 4 and cfg.spra.trainable_modules == ["score"]
    assert cfg.output_dir == str(Path("runs") / "exp")  # default: runs/<config file stem>
    assert cfg.lr == 3e-3  # untouched default: the rate the quality study chose for SpaRA


def test_dotted_and_bare_overrides(tmp_path):
    path = write(tmp_path, "spra:\n  lora_rank: 8\n")
    cfg = load_config(path, ["spra.lora_rank=4", "max_length=48", "data.train_size=100", "lr=3e-4"])
    assert cfg.spra.lora_rank == 4
    assert cfg.data.max_length == 48
    assert cfg.data.train_size == 100
    assert cfg.lr == pytest.approx(3e-4)  # YAML 1.1 reads "3e-4" as a string; a float field converts it
    assert load_config(path, ["lora_rank=2"]).spra.lora_rank == 2


def test_bare_seed_is_training_seed_and_dotted_is_mask_seed():
    cfg = load_config(None, ["seed=7", "spra.seed=99"])
    assert cfg.seed == 7
    assert cfg.spra.seed == 99
    assert load_config(None, ["seed=5"]).spra.seed is None


def test_list_and_null_overrides():
    cfg = load_config(None, ["target_modules=[q_proj, v_proj]", "head_lr=null", "max_grad_norm=null"])
    assert cfg.spra.target_modules == ["q_proj", "v_proj"]
    assert cfg.head_lr is None and cfg.max_grad_norm is None


def test_density_override_replaces_lora_rank_from_file(tmp_path):
    path = write(tmp_path, "spra:\n  lora_rank: 8\n")
    cfg = load_config(path, ["density=0.02"])
    assert cfg.spra.density == pytest.approx(0.02) and cfg.spra.lora_rank is None


def test_both_budgets_in_file_is_an_error(tmp_path):
    path = write(tmp_path, "spra:\n  lora_rank: 8\n  density: 0.1\n")
    with pytest.raises(ValueError, match="exactly one of lora_rank and density"):
        load_config(path)


@pytest.mark.parametrize(("key", "nearest"), [
    ("lora_rnak", "lora_rank"), ("data.max_lenght", "data.max_length"), ("max_step", "max_steps"),
    ("spra.sed", "spra.seed"),
])
def test_unknown_key_suggests_nearest(key, nearest):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'; did you mean '{nearest}'"):
        load_config(None, [f"{key}=1"])


@pytest.mark.parametrize(("key", "ours"), [
    ("sequence_length", "data.max_length"), ("max_seq_len", "data.max_length"),  # torchtune
    ("max_seq_length", "data.max_length"), ("learning_rate", "lr"),  # TRL, the HF Trainer
    ("num_train_epochs", "max_steps"), ("per_device_train_batch_size", "batch_size"),
])
def test_other_tools_names_find_ours(tmp_path, key, ours):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'; did you mean '{ours}'"):
        load_config(None, [f"{key}=1"])
    if ours.startswith("data."):  # where a YAML file writes it: inside the data section
        path = write(tmp_path, f"data:\n  {key}: 1024\n")
        with pytest.raises(ValueError, match=f"unknown config key 'data.{key}'; did you mean '{ours}'"):
            load_config(path)


def test_other_tools_names_that_count_differently_say_how():
    with pytest.raises(ValueError, match="did you mean 'max_steps'.*counts optimizer steps, not epochs"):
        load_config(None, ["num_train_epochs=3"])
    with pytest.raises(ValueError, match="did you mean 'batch_size'.*the global batch"):
        load_config(None, ["per_device_train_batch_size=4"])
    # axolotl's sequence_len and TRL's max_length are accepted as they are
    assert load_config(None, ["sequence_len=96"]).data.max_length == 96
    assert load_config(None, ["max_length=80"]).data.max_length == 80


def test_unknown_key_in_file_is_rejected(tmp_path):
    path = write(tmp_path, "model:\n  sorce: minilm\n")
    with pytest.raises(ValueError, match="did you mean 'model.source'"):
        load_config(path)


def test_ambiguous_bare_key_lists_the_dotted_ones():
    with pytest.raises(ValueError, match="ambiguous.*data.source.*model.source|ambiguous.*model.source.*data.source"):
        resolve_key("source")


@pytest.mark.parametrize(("override", "key"), [
    ("max_steps=ten", "max_steps='ten'"), ("lr=fast", "lr='fast'"), ("seed=[1]", "seed=[1]"),
    ("gradient_checkpointing=maybe", "model.gradient_checkpointing='maybe'"), ("max_steps=true", "max_steps=True"),
    ("trainable_modules=[1]", "spra.trainable_modules=1"), ("model.source=3", "model.source=3"),
])
def test_bad_type_names_key_and_value(override, key):
    with pytest.raises(ValueError, match="wrong type") as err:
        load_config(None, [override])
    assert key in str(err.value)


@pytest.mark.parametrize(("override", "message"), [
    ("model.source=gpt5", "model.source='gpt5' is not one of"), ("max_steps=0", "max_steps=0 must be"),
    ("grad_accum=3", "batch_size=32 is not divisible by grad_accum=3"), ("schedule=step", "schedule='step'"),
])
def test_bad_values(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(("override", "attr", "value"), [
    ("max_steps=5.0", "max_steps", 5), ("lr=1", "lr", 1.0), ("lr=3e-4", "lr", 3e-4), ("lr='1e-2'", "lr", 1e-2),
    ("mixed_precision=no", "mixed_precision", "no"), ("mixed_precision=off", "mixed_precision", "no"),
    ("density=1e-2", "spra.density", 1e-2), ("lora_rank=4.0", "spra.lora_rank", 4),
    ("data.eval_fraction=0.25", "data.eval_fraction", 0.25),
])
def test_values_yaml_means_are_converted(override, attr, value):
    """An integral float for an int, an int or a numeric string for a float (YAML 1.1 reads 3e-4 as a string),
    a YAML boolean for a choice (mixed_precision: no reads as False)."""
    cfg = load_config(None, [override])
    got = cfg
    for part in attr.split("."):
        got = getattr(got, part)
    assert got == pytest.approx(value) and type(got) is type(value)


REFUSED_CONVERSIONS = [
    ("lr=true", "lr=True has the wrong type; expected float"),
    ("lora_rank=true", "spra.lora_rank=True has the wrong type; expected int"),
    ("spra.seed=false", "spra.seed=False has the wrong type; expected int"),
    ("density=true", "spra.density=True has the wrong type; expected float"),
    ("max_steps='5'", "max_steps='5' has the wrong type; expected int"),
    ("max_steps=5.5", "max_steps=5.5 has the wrong type; expected int"),
    ("max_steps=false", "max_steps=False has the wrong type; expected int"),
    ("data.eval_fraction=true", "data.eval_fraction=True has the wrong type; expected float"),
    ("gradient_checkpointing=1", "model.gradient_checkpointing=1 has the wrong type; expected bool"),
    ("overwrite='true'", "overwrite='true' has the wrong type; expected bool"),
    ("target_modules=[1]", "spra.target_modules=[1] has the wrong type; expected str | list[str]"),
    ("trainable_modules=head", "spra.trainable_modules='head' has the wrong type; expected list[str]"),
    ("data.datasets=x", "data.datasets='x' has the wrong type; expected list[DatasetEntry]"),
    ("data.datasets=[3]", "data.datasets[0]=3 has the wrong type; expected a mapping of DatasetEntry fields"),
    ("data.datasets=[{path: a, column_map: {text: 1}}]", "data.datasets[0].column_map.text=1 has the wrong type"),
    ("mixed_precision=yes", "mixed_precision='yes' is not one of auto, no, bf16"),
]
BOUNDS_AND_CHOICES = [
    ("checkpoint_keep=-1", "checkpoint_keep=-1 is negative; use 0 or more"),
    ("eval_generate_max_tokens=0", "eval_generate_max_tokens=0 must be a positive integer"),
    ("model.hidden_size=0", "model.hidden_size=0 must be a positive integer"),
    ("data.eval_fraction=0", "data.eval_fraction=0 must lie in (0, 1)"),
    ("data.datasets=[{path: a, type: chat, max_samples: 0}]", "data.datasets[0].max_samples=0 must be a positive"),
    ("data.datasets=[{path: a, type: chat, roles_to_train: [bot]}]",
     "data.datasets[0].roles_to_train='bot' is not one of system, user, assistant, tool"),
    ("data.datasets=[{path: a, type: chat, roles: {bot: [x]}}]", "data.datasets[0].roles='bot' is not one of"),
    ("data.datasets=[{path: a}, {path: b, typo: 1}]", "unknown key data.datasets[1].typo; did you mean 'type'?"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED_CONVERSIONS + BOUNDS_AND_CHOICES)
def test_bad_values_name_the_dotted_key_and_what_it_takes(override, message):
    """Bounds, choices and types; pydantic's lax mode would read True as 1, "5" as 5 and 1 as True, which a config
    value never means, so those are refused too."""
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_a_config_built_in_python_is_checked_as_a_loaded_one():
    TrainConfig(lr=1, mixed_precision="no").validate()
    for cfg, message in [(TrainConfig(max_steps=True), "max_steps=True has the wrong type"),
                         (TrainConfig(engine="tpu"), "engine='tpu' is not one of auto, none, ddp, fsdp2, deepspeed"),
                         (TrainConfig(checkpoint_every=-1), "checkpoint_every=-1 is negative")]:
        with pytest.raises(ValueError) as err:
            cfg.validate()
        assert message in str(err.value)
    with pytest.raises(ValueError, match="unknown key spra.lora_rnak; did you mean 'lora_rank'"):
        from_dict({"spra": {"lora_rnak": 4}})


# Each choice is one Literal; the tuples, the schema and the messages derive from it.
CHOICES = [
    ("engine", engines.EngineName), ("mixed_precision", engines.MixedPrecision), ("device", devices.Device),
    ("report_to", trackers.TrackerName), ("model.source", schema.ModelSource), ("model.task", schema.Task),
    ("model.dtype", schema.Dtype), ("schedule", schema.Schedule), ("on_nonfinite", schema.OnNonfinite),
    ("data.source", data_config.DataSource), ("data.excess_length", data_config.ExcessLength),
]


def spelled_out(options: tuple[str, ...], text: str) -> bool:
    """The options written out by hand: as a tuple of strings outside their Literal, or as prose ("a, b or c")."""
    quoted = ", ".join(f'"{o}"' for o in options)
    prose = re.escape(", ".join(options[:-1])) + r",? (or|and) " + re.escape(options[-1])
    return text.count(quoted) > text.count(f"Literal[{quoted}]") or re.search(prose, text) is not None


@pytest.mark.parametrize(("key", "literal"), CHOICES, ids=[c[0] for c in CHOICES])
def test_each_choice_is_declared_once_and_named_by_its_literal(key, literal):
    options = get_args(literal)
    with pytest.raises(ValueError) as err:
        load_config(None, [f"{key}=nope"])
    assert f"{key}='nope' is not one of {', '.join(options)}" in str(err.value)
    package = Path(spra_dist.__file__).parent
    by_hand = [str(p.relative_to(package)) for p in package.rglob("*.py") if spelled_out(options, p.read_text())]
    assert by_hand == [], f"the options of {key} are written out in {by_hand}; derive them from the Literal"


def test_data_types_and_roles_are_literals():
    assert data_config.DATA_TYPES == get_args(data_config.DataType)
    assert data_config.ROLES == get_args(data_config.Role)
    assert schema.MODEL_SOURCES == get_args(schema.ModelSource)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_to_dict_and_from_dict_round_trip(path):
    cfg = load_config(path)
    assert from_dict(to_dict(cfg)) == cfg


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="not key=value"):
        parse_override("max_steps")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_override("target_modules=[q_proj")
    with pytest.raises(ValueError, match="does not exist"):
        load_config("no/such/file.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_open_with_their_command(path):
    cfg = load_config(path)
    assert cfg.output_dir == str(Path("runs") / path.stem)
    first = path.read_text().splitlines()[0]  # the command that runs it, or the launcher line for several GPUs
    assert first.startswith("# ") and re.search(rf"(spra train --config|launch/\w+\.sh \w+) configs/train/{path.name}",
                                                first)


# --------------------------------------------------------------------------- batch order and schedule


def test_global_batch_is_a_pure_function_covering_each_epoch():
    n, batch = 50, 10
    steps = [global_batch(n, batch_size=batch, step=s, seed=3) for s in range(5)]
    assert sorted(i for step in steps for i in step) == list(range(n))  # one epoch = every example once
    assert global_batch(n, batch_size=batch, step=2, seed=3) == steps[2]
    assert global_batch(n, batch_size=batch, step=2, seed=4) != steps[2]
    assert global_batch(n, batch_size=batch, step=5, seed=3) != steps[0]  # next epoch, new order


def test_rank_slices_partition_the_global_batch():
    idx = global_batch(100, batch_size=12, step=4, seed=0)
    for world in (1, 2, 3, 4):
        parts = [rank_slice(idx, rank=r, world_size=world) for r in range(world)]
        assert [i for part in parts for i in part] == idx
    with pytest.raises(ValueError, match="not divisible by the world size 5"):
        rank_slice(idx, rank=0, world_size=5)
    assert split_micro(idx[:6], 3) == [idx[0:2], idx[2:4], idx[4:6]]


def test_lr_schedule():
    kw = dict(warmup_steps=4, max_steps=14)
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.25)
    assert lr_factor(3, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(9, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_factor(14, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12, schedule="constant", **kw) == 1.0
