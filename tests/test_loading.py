"""A saved base under fsdp2 / ZeRO-3 is built on the meta device, sharded, then loaded: each rank holds its shard
plus one tensor in flight, never the whole base, and ends with the tensors and the adapter that today's path
(``from_pretrained`` on every rank, then sharding) gives. A tensor the base lacks is an error that names it.

The 2-rank cases run in one job (tests/dist_loading_worker.py); the measured peak memory growth per rank is
checked against a bound computed from the model's sizes, which today's path exceeds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DEBUG = str(ROOT / "configs/train/debug_tiny_llama.yaml")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The bases the worker saved, and each rank's results."""
    root = tmp_path_factory.mktemp("bases")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_loading_worker.py"), str(root), str(root / "result.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((root / "result.json").read_text())
    assert result["world_size"] == 2
    return root, result["ranks"]


@pytest.mark.parametrize("case", ["fsdp2_big", "zero3_big"])
def test_each_rank_holds_its_shard_not_the_base(case, two_ranks):
    """374 MB of fp32 parameters (a bf16 file): each rank's peak growth stays under its half plus twice the
    largest tensor plus 32 MB, while today's path (every rank converts the whole base) goes over it."""
    for rank in two_ranks[1]:
        got = rank[case]
        assert got["new_mb"] < got["bound_mb"] < got["today_mb"], got
        assert got["today_mb"] > 374  # the whole base in fp32


@pytest.mark.parametrize("case", ["fsdp2_big", "zero3_big", "fsdp2_tied", "fsdp2_head", "zero3_head", "zero3_bf16"])
def test_loaded_as_from_pretrained(case, two_ranks):
    """Every rank's part of every parameter and buffer (rotary inv_freq, BERT's position ids) equals today's, and
    so do the adapters after two steps; tied embeddings stay one parameter; the classifier head the base lacks
    gets the init from_pretrained gives it; ZeRO-3 in bf16 partitions bf16 parameters, as deepspeed.initialize
    casts a whole model."""
    for rank in two_ranks[1]:
        got = rank[case]
        assert got["differing"] == []
        assert got.get("adapter_differs", []) == []
        if case.endswith("_head"):
            assert got["trained"] == ["classifier.bias", "classifier.weight"]
        if case == "fsdp2_tied":
            assert got["tied"] is True


def test_spra_train_on_a_base_loaded_after_sharding(two_ranks, tmp_path):
    """spra train with model.source=hf under ZeRO-3 (built on meta, loaded module by module): the adapter it writes,
    on the base loaded whole in one process, gives the eval loss the run reported."""
    root, _ = two_ranks
    out = tmp_path / "run"
    args = [f"output_dir={out}", "model.source=hf", f"model.name_or_path={root / 'tied'}", "engine=deepspeed",
            f"deepspeed_config={root / 'zero3.json'}", "max_steps=2", "batch_size=8", "eval_size=16", "eval_every=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "spra_dist",
           "train", "--config", DEBUG, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["engine"]) == (2, "deepspeed")
    from spra_dist.train.config import load_config
    from spra_dist.train.recipe import evaluate_adapter

    metrics = evaluate_adapter(load_config(DEBUG, args), root / "tied", out / "adapter")
    assert abs(metrics["eval_loss"] - summary["eval_loss_after"]) < 1e-5


def meta_plan(path: Path, **model):
    from spra_dist import SpraConfig, apply_spra
    from spra_dist.distributed.loading import plan_load
    from spra_dist.train.models import build_model
    from spra_dist.train.schema import ModelConfig

    built = build_model(ModelConfig(source="hf", name_or_path=str(path), **model), seed=0, meta=True)
    model = apply_spra(built.model, SpraConfig(seed=1))
    return model, plan_load(model, built.base, initial=built.initial, device=torch.device("cpu"))


def copy_base(src: Path, dst: Path, *, drop: str | None = None, config: dict | None = None) -> Path:
    """``src`` with one tensor left out of its weights, or with ``config`` written over its config.json."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if k != drop}
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    return dst


def test_a_tensor_the_base_lacks_is_named(tiny_base, tmp_path):
    lacking = copy_base(tiny_base, tmp_path / "lacking", drop="model.norm.weight")
    with pytest.raises(ValueError, match=r"tensor for 1 parameter\(s\) of LlamaForCausalLM: \['model.norm.weight'\]"):
        meta_plan(lacking)


def test_a_head_the_base_lacks_must_be_trained(tiny_base):
    """A classification head that nothing trains would stay a random frozen layer: an error naming it."""
    with pytest.raises(ValueError, match=r"\['score.weight'\].*spra.trainable_modules"):
        meta_plan(tiny_base, task="classification")


def test_a_config_that_does_not_match_the_weights(tiny_base, tmp_path):
    wider = copy_base(tiny_base, tmp_path / "wider", config={"intermediate_size": 48})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \[32, 16\], the model's "):
        meta_plan(wider)


def test_a_base_without_safetensors(tiny_base, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((tiny_base / name).read_bytes())
    with pytest.raises(ValueError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        meta_plan(bare)


def test_resumed_values_wait_in_the_plan(tiny_base):
    """On resume the checkpoint's values of a model built on meta go into the plan, written when the base loads."""
    from spra_dist.core.model import trainable_parameters
    from spra_dist.train.checkpoint import RNG_KEY, Checkpoint, load_values

    model, plan = meta_plan(tiny_base)
    values = {name: torch.full(p.shape, 0.5) for name, p in trainable_parameters(model)}
    load_values(model, Checkpoint(Path("ckpt"), 1, {}, {**values, RNG_KEY: torch.get_rng_state()}), plan=plan)
    assert plan.initial.keys() == values.keys()
    assert all(torch.equal(plan.initial[n], v) for n, v in values.items())
