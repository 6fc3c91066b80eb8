"""Weight sync to rollout engines: the sparse sync between processes (spra_dist.distributed.sync), the merged
tensors for engines that take whole weights (merged_named_parameters), and TRL's vLLM path (SpraGRPOTrainer).

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_weight_sync.py

vLLM cannot run here: TRL's own ``VLLMGeneration.sync_weights`` is driven against stand-in vLLM objects that record
what they receive (a server client's ``update_named_params``, a colocated engine's ``load_weights``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

from spra_dist import SpraConfig, apply_spra, merge_adapter, spra_modules
from spra_dist.adapters.merge import merged_named_parameters
from spra_dist.distributed.sync import WeightReceiver, WeightSender

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def trained(model, *, seed: int = 0):
    """``model`` with random values in every adapter (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("spra_values"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_merged_named_parameters_equal_merge_adapter(build):
    model = trained(apply_spra(build(), SpraConfig(lora_rank=2, seed=7)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = dict(merged_named_parameters(model))
    reference = merge_adapter(copy.deepcopy(model))
    assert list(merged) == [n for n, _ in build().named_parameters()]  # the plain model's names, in its order
    assert all(torch.equal(merged[n], p) for n, p in reference.named_parameters())
    base = dict(build().named_parameters())
    changed = {n for n in merged if not torch.equal(merged[n], base[n])}
    assert changed == {f"{name}.weight" for name, _ in spra_modules(model)}  # W + delta there, the rest as it was
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model is left as it was


def test_merged_named_parameters_in_another_dtype_round_once():
    """dtype=bf16 from an fp32 model: what merging the same values into the base loaded in bf16 gives."""
    model = trained(apply_spra(tiny_llama(), SpraConfig(lora_rank=2, seed=7)))
    bf16 = apply_spra(tiny_llama().to(torch.bfloat16), SpraConfig(lora_rank=2, seed=7))  # fp32 values, bf16 weights
    bf16.load_state_dict({n: p for n, p in model.state_dict().items() if n.endswith("spra_values")}, strict=False)
    merged = dict(merged_named_parameters(model, dtype=torch.bfloat16))
    reference = merge_adapter(bf16)
    assert all(merged[n].dtype == torch.bfloat16 and torch.equal(merged[n], p) for n, p in reference.named_parameters())


def test_sync_needs_a_process_group():
    with pytest.raises(ValueError, match="needs a process group"):
        WeightSender(apply_spra(tiny_llama(), SpraConfig(seed=1)))
    with pytest.raises(ValueError, match="needs a process group"):
        WeightReceiver(tiny_llama())


def test_bench_llama3_rows_match_the_closed_form():
    """bench.weight_sync's on-paper rows: k = r · Σ (n_in + n_out) over q, k, v, o, gate, up, down per layer."""
    from bench.weight_sync import LLAMA3, computed_llama3, table

    for name, (hidden, inter, layers, _) in LLAMA3.items():
        row = computed_llama3(name)
        kv = 8 * hidden // LLAMA3[name][3]  # 8 key/value heads of the attention heads' width
        per_layer = 2 * (2 * hidden) + 2 * (hidden + kv) + 3 * (hidden + inter)
        assert row["k_total"] == 8 * per_layer * layers
        assert row["sparse_bytes"] == 2 * row["k_total"]
    assert "| Llama-3-70B | 103,546,880 | 207.1 MB | 141.1 GB | 681× | computed |" in table([computed_llama3(
        "Llama-3-70B")])


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    """tests/dist_sync_worker.py on 2 gloo ranks, every scenario in one job: {(rank, scenario): result} and stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_sync_worker.py"), "fp32", "bf16", "fsdp2", "dense", "seed",
           "lora_rank"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240, cwd=ROOT / "tests")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["rank"], r["scenario"]] = r
    return {"results": results, "stderr": proc.stderr, "returncode": proc.returncode}


@pytest.mark.slow
@pytest.mark.parametrize("scenario,elsize", [("fp32", 4), ("bf16", 2), ("fsdp2", 4), ("dense", 4)])
def test_rollout_holds_the_trainers_merged_weights(two_ranks, scenario, elsize):
    """3 AdamW steps, a sync after each: the rollout process's logits and tensors equal the trainer's merged model
    bit for bit (bf16: the rollout in bf16, the values sent in bf16, against the trainer's merge done in bf16;
    fsdp2: the trainer's values are FSDP2 DTensors, on a mesh of the trainer alone; dense: the output head trained
    densely as well). Per sync: one broadcast of k_total values (plus the dense head's 128 × 32) and nothing else."""
    r = two_ranks["results"].get((0, scenario))
    assert r is not None, two_ranks["stderr"][-3000:]
    assert (1, scenario) in two_ranks["results"]
    assert r["trained"] and r["logits_equal"] and r["tensors_equal"]
    assert r["dtype"] == ("torch.bfloat16" if scenario == "bf16" else "torch.float32")  # bf16: the rollout's dtype
    numel = r["k_total"] + (128 * 32 if scenario == "dense" else 0)
    assert r["k_total"] == 2048 and r["nbytes"] == numel * elsize
    assert len(r["per_sync"]) == 3
    for sync in r["per_sync"]:
        assert sync == {"sent": numel * elsize, "bytes": {"broadcast": numel * elsize}, "calls": {"broadcast": 1}}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["seed", "lora_rank"])
def test_rollout_with_other_masks_is_refused_on_both_ranks(two_ranks, scenario):
    assert two_ranks["returncode"] != 0
    for rank in (0, 1):
        line = next((x for x in two_ranks["stderr"].splitlines() if x.startswith(f"rank {rank} {scenario} error: ")),
                    None)
        assert line is not None, two_ranks["stderr"][-3000:]
        assert "rollout weight sync refused: SpaRA masks differ across ranks: the first differing mask is " \
               "'model.layers.0.mlp.down_proj.weight'" in line
        assert ("('seed', 99)" if scenario == "seed" else "('lora_rank', 4)") in line
    assert (0, scenario) not in two_ranks["results"] and (1, scenario) not in two_ranks["results"]


# --- TRL's vLLM path ----------------------------------------------------------------------------------------------


class ServerClient:
    """Stands in for trl.generation.vllm_client.VLLMClient: records each streamed sync."""

    def __init__(self) -> None:
        self.syncs: list[dict[str, torch.Tensor]] = []
        self.metadata = None

    def update_named_params(self, metadata, named_params) -> None:
        self.metadata = metadata
        self.syncs.append({name: t.detach().clone() for name, t in named_params})

    def reset_prefix_cache(self) -> None:
        pass


class ColocatedEngine:
    """Stands in for vllm.LLM in colocate mode: records ``load_weights`` calls."""

    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] = {}
        model = SimpleNamespace(load_weights=lambda pairs: self.loaded.update({n: t.clone() for n, t in pairs}))
        runner = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=runner))

    def reset_prefix_cache(self) -> None:
        pass


def grpo_trainer(trainer_class, tmp_path, *, callbacks=()):
    """A GRPOTrainer with use_vllm=True on a tiny SpaRA Llama, built by TRL's own __init__; only vLLM's start
    (VLLMGeneration._init_vllm) is stubbed, since vLLM is not installed."""
    from datasets import Dataset
    from trl import GRPOConfig
    from trl.generation.vllm_generation import VLLMGeneration

    tokenizer = tiny_tokenizer()
    model = trained(apply_spra(tiny_llama(vocab=len(tokenizer)), SpraConfig(lora_rank=2, seed=1234)))
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, use_vllm=True, vllm_mode="server",
                      vllm_importance_sampling_correction=False, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, max_steps=1, report_to=[], disable_tqdm=True)
    with mock.patch.object(VLLMGeneration, "_init_vllm", lambda self: None):
        trainer = trainer_class(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                args=args, train_dataset=Dataset.from_dict({"prompt": ["two plus two makes"] * 4}),
                                processing_class=tokenizer, callbacks=list(callbacks))
    return trainer, model


@pytest.mark.slow
def test_spra_grpo_trainer_pushes_merged_weights_through_trls_sync(tmp_path):
    from spra_dist.integrations.hf import SpraAdapterCallback
    from spra_dist.integrations.trl import SpraGRPOTrainer

    trainer, model = grpo_trainer(SpraGRPOTrainer, tmp_path, callbacks=[SpraAdapterCallback()])
    generation = trainer.vllm_generation
    generation.vllm_client = client = ServerClient()
    generation.sync_weights()  # TRL's own code: metadata pass, then the stream
    with torch.no_grad():  # an optimizer step moves the values; the next sync carries them
        for n, p in model.named_parameters():
            if n.endswith("spra_values"):
                p.add_(0.01)
    generation.sync_weights()
    expected = dict(merged_named_parameters(model))
    plain_names = [n for n, _ in tiny_llama(vocab=len(tiny_tokenizer())).named_parameters()]
    assert [m[0] for m in client.metadata] == plain_names  # what vLLM's model knows, no spra_values
    assert list(client.syncs[-1]) == plain_names
    assert all(torch.equal(client.syncs[-1][n], expected[n]) for n in plain_names)
    reference = merge_adapter(copy.deepcopy(model))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(client.syncs[-1][q], reference.get_parameter(q))  # W + delta, not the frozen W
    assert not torch.equal(client.syncs[0][q], client.syncs[1][q])

    generation.mode, generation.llm = "colocate", ColocatedEngine()  # the colocated engine's load_weights
    generation.sync_weights()
    assert list(generation.llm.loaded) == plain_names
    assert all(torch.equal(generation.llm.loaded[n], expected[n]) for n in plain_names)
    trainer.add_callback(SpraAdapterCallback(adapter_only=False))  # one added later is told as well
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)  # the guard lets it start


@pytest.mark.slow
def test_plain_grpo_trainer_with_vllm_is_refused(tmp_path):
    """TRL's own trainer would push the frozen base and the values under names vLLM lacks; SpraAdapterCallback
    stops it before training starts."""
    from trl import GRPOTrainer

    from spra_dist.integrations.hf import SpraAdapterCallback

    trainer, model = grpo_trainer(GRPOTrainer, tmp_path, callbacks=[SpraAdapterCallback()])
    trainer.vllm_generation.vllm_client = client = ServerClient()
    trainer.vllm_generation.sync_weights()
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.spra_values" in client.syncs[0]
    assert torch.equal(client.syncs[0][f"{q}.weight"], model.get_parameter(f"{q}.weight"))  # the frozen base
    with pytest.raises(ValueError, match="use_vllm=True with a SpaRA model.*SpraGRPOTrainer"):
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
