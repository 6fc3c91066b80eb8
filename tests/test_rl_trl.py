"""TRL's GRPO and DPO on a SpaRA model: the reference model is the policy with its adapter bypassed, no copy.

    HF_HUB_OFFLINE=1 python -m pytest -q tests/test_rl_trl.py

This file is also the worker that ``torchrun`` starts (``__main__`` below): each rank trains the same tiny SpaRA
Llama with SpraDPOTrainer and SpraGRPOTrainer under DDP and reports what it saw.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PAIRS = [("the colour of snow is", " white", " black"), ("the colour of coal is", " black", " white"),
         ("the colour of grass is", " green", " red"), ("the colour of blood is", " red", " green"),
         ("the colour of the sky is", " blue", " yellow"), ("the colour of the sun is", " yellow", " blue"),
         ("two plus two makes", " four", " five"), ("three plus three makes", " six", " ten")]


def spra_llama(tokenizer, seed: int = 0):
    from tiny_models import tiny_llama

    from spra_dist import SpraConfig, apply_spra

    base = tiny_llama(seed=seed, vocab=len(tokenizer)).eval()
    return base, apply_spra(copy.deepcopy(base), SpraConfig(lora_rank=2, seed=1234))


def pairs_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                              "rejected": [r for _, _, r in PAIRS]})


def four_reward(completions, **_):
    """A verifiable reward the tiny model sometimes earns by chance: how often it says "four"."""
    return [float(c.split().count("four")) for c in completions]


def grpo(model, tokenizer, out, *, bf16: bool, steps: int = 3, **extra):
    from datasets import Dataset
    from trl import GRPOConfig

    from spra_dist.integrations.hf import SpraAdapterCallback
    from spra_dist.integrations.trl import SpraGRPOTrainer

    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=bf16, beta=0.1, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=6, max_steps=steps, learning_rate=2e-2,
                      report_to=[], disable_tqdm=True, logging_steps=1, seed=0, **extra)
    return SpraGRPOTrainer(model=model, reward_funcs=four_reward, args=args,
                           train_dataset=Dataset.from_dict({"prompt": ["two plus two makes"] * 32}),
                           processing_class=tokenizer, callbacks=[SpraAdapterCallback()])


def dpo(model, tokenizer, out, *, bf16: bool, precompute: bool = False, batch: int = 4, steps: int = 2, **extra):
    from trl import DPOConfig

    from spra_dist.integrations.hf import SpraAdapterCallback
    from spra_dist.integrations.trl import SpraDPOTrainer

    args = DPOConfig(output_dir=str(out), use_cpu=True, bf16=bf16, per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=2e-2, precompute_ref_log_probs=precompute, report_to=[], disable_tqdm=True,
                     logging_steps=1, seed=0, save_strategy="no", **extra)
    return SpraDPOTrainer(model=model, args=args, train_dataset=pairs_dataset(), processing_class=tokenizer,
                          callbacks=[SpraAdapterCallback()])


def log_probs(model, ids: torch.Tensor, *, bf16: bool) -> torch.Tensor:
    """Per-token log-probabilities through TRL's fused head, under the autocast the trainer uses."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs


def with_fused_head(model):
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    return model


IDS = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 2], [1, 24, 25, 24, 26, 27, 2, 4]])  # tiny_tokenizer: 33 ids


def test_bypass_adapter_gives_the_base_bit_for_bit_and_keeps_the_values():
    from tiny_models import tiny_llama

    from spra_dist import SpraConfig, apply_spra, trainable_parameters
    from spra_dist.adapters.named import bypass_adapter

    base = tiny_llama().eval()
    model = apply_spra(copy.deepcopy(base), SpraConfig(lora_rank=2, seed=1234)).eval()
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.normal_(0, 0.05)
    values = [p.detach().clone() for _, p in trainable_parameters(model)]
    with torch.no_grad():
        adapted, plain = model(IDS).logits, base(IDS).logits
        assert not torch.equal(adapted, plain)
        with bypass_adapter(model):
            assert torch.equal(model(IDS).logits, plain)
        assert torch.equal(model(IDS).logits, adapted)
        with pytest.raises(RuntimeError, match="inside"), bypass_adapter(model):
            raise RuntimeError("inside")
        assert torch.equal(model(IDS).logits, adapted)  # an error inside the block switches the adapter back
    assert all(torch.equal(a, p) for a, (_, p) in zip(values, trainable_parameters(model), strict=True))


def test_bypass_adapter_refuses_what_it_cannot_undo():
    from tiny_models import tiny_llama

    from spra_dist import SpraConfig, apply_spra, spra_modules
    from spra_dist.adapters.named import bypass_adapter

    dense = apply_spra(tiny_llama(), SpraConfig(lora_rank=2, seed=1, trainable_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"trains \['lm_head.weight'\] densely.*disable_adapter"):
        with bypass_adapter(dense):
            pass
    merged = apply_spra(tiny_llama(), SpraConfig(lora_rank=2, seed=1))
    spra_modules(merged)[0][1].merge()
    with pytest.raises(ValueError, match="merged into the weight.*unmerge"):
        with bypass_adapter(merged):
            pass


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_grpo_reference_is_the_bypassed_policy(bf16, tmp_path):
    """No second model: TRL scores the reference with the policy itself, adapter bypassed, equal to the base."""
    from tiny_models import tiny_tokenizer

    from spra_dist import load_adapter, trainable_parameters
    from spra_dist.integrations.trl import BaseReference

    tokenizer = tiny_tokenizer()
    base, model = spra_llama(tokenizer)
    trainer = grpo(model, tokenizer, tmp_path, bf16=bf16, save_strategy="steps", save_steps=3)
    assert isinstance(trainer.ref_model, BaseReference) and list(trainer.ref_model.parameters()) == []
    assert trainer.beta == trainer.args.beta == 0.1  # set to 0 only while TRL's __init__ ran
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kl) == 3 and kl[0] == 0.0 and kl[-1] > 0  # the first rollout's policy is the reference; then it moves
    ref = log_probs(trainer.ref_model, IDS, bf16=bf16)
    assert torch.equal(ref, log_probs(with_fused_head(base), IDS, bf16=bf16))
    assert not torch.equal(ref, log_probs(model, IDS, bf16=bf16))
    fresh = load_adapter(spra_llama(tokenizer)[0], tmp_path / "checkpoint-3" / "adapter")  # SpraAdapterCallback's
    pairs = zip(trainable_parameters(fresh), trainable_parameters(model), strict=True)
    assert all(torch.equal(a, b) for (_, a), (_, b) in pairs)


@pytest.mark.parametrize("precompute", [False, True], ids=["online", "precomputed"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_dpo_reference_is_the_bypassed_policy(bf16, precompute, tmp_path):
    from tiny_models import tiny_tokenizer

    from spra_dist.integrations.trl import BaseReference

    tokenizer = tiny_tokenizer()
    base, model = spra_llama(tokenizer)
    with torch.no_grad():  # an adapter that already moved: the reference is still the base
        for n, p in model.named_parameters():
            if n.endswith("spra_values"):
                p.normal_(0, 0.02)
    trainer = dpo(model, tokenizer, tmp_path, bf16=bf16, precompute=precompute)
    assert isinstance(trainer.ref_model, BaseReference) and list(trainer.ref_model.parameters()) == []
    if precompute:  # scored before training, with the adapter bypassed
        row = trainer.train_dataset[0]
        chosen = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
        # TRL sums log p(completion | prompt) over the completion's tokens
        n = len(row["chosen_ids"])
        expected = log_probs(with_fused_head(copy.deepcopy(base)), chosen, bf16=bf16)[0, -n:].sum()
        assert abs(row["ref_chosen_logps"] - float(expected)) < (1e-5 if not bf16 else 2e-2)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and losses[-1] < losses[0] + 0.05
    assert torch.equal(log_probs(trainer.ref_model, IDS, bf16=bf16), log_probs(with_fused_head(base), IDS, bf16=bf16))


def test_refusals_name_the_setting():
    from tiny_models import tiny_tokenizer

    from spra_dist.integrations.trl import SpraDPOTrainer, SpraGRPOTrainer

    _, model = spra_llama(tiny_tokenizer())
    deepspeed = SimpleNamespace(sync_ref_model=False, precompute_ref_log_probs=False,
                                distributed_state=SimpleNamespace(distributed_type="DistributedType.DEEPSPEED"))
    with pytest.raises(ValueError, match="not DEEPSPEED.*multi-GPU \\(DDP\\).*ref_model="):
        SpraDPOTrainer(model=model, args=deepspeed)
    with pytest.raises(ValueError, match="sync_ref_model=True with a SpaRA model"):
        SpraDPOTrainer(model=model, args=SimpleNamespace(sync_ref_model=True))
    with pytest.raises(ValueError, match="sync_ref_model=True with a SpaRA model"):
        SpraGRPOTrainer(model, lambda completions, **_: [0.0], SimpleNamespace(beta=0.1, sync_ref_model=True))


@pytest.mark.slow
def test_ddp_two_ranks(tmp_path):
    """DPO under DDP on 2 ranks (2 pairs each) = one process (4 pairs), fp32; GRPO under DDP in bf16 autocast keeps
    the ranks' values equal; on every rank the reference is the base."""
    from tiny_models import tiny_tokenizer

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "world.json").read_text())
    assert report["world_size"] == 2 and report["trainer_world_size"] == [2, 2] and all(report["reference_is_base"])
    for run in ("dpo", "grpo"):
        sums = report[run]
        assert sums[0] == sums[1] and sums[0][1] > 0, (run, sums)  # the ranks agree, and the values moved

    tokenizer = tiny_tokenizer()
    _, model = spra_llama(tokenizer)
    dpo(model, tokenizer, tmp_path / "one", bf16=False, batch=4).train()
    one = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("spra_values")])
    two = torch.load(tmp_path / "dpo_values.pt")
    assert (one - two).abs().max() <= 1e-5 * one.abs().max()


def worker(out: Path) -> None:
    import torch.distributed as dist
    from tiny_models import tiny_tokenizer

    from spra_dist.distributed.group import exit_rank, init_distributed, shutdown

    rank, size = init_distributed(backend="gloo")
    tokenizer = tiny_tokenizer()
    report = {"world_size": size, "reference_is_base": []}
    for run in ("dpo", "grpo"):
        base, model = spra_llama(tokenizer)
        if run == "dpo":
            trainer = dpo(model, tokenizer, out / run, bf16=False, batch=2, ddp_backend="gloo")
        else:
            trainer = grpo(model, tokenizer, out / run, bf16=True, steps=2, ddp_backend="gloo", save_strategy="no")
        trainer.train()
        report.setdefault("trainer_world_size", []).append(trainer.args.world_size)
        bf16 = run == "grpo"
        report["reference_is_base"].append(torch.equal(log_probs(trainer.ref_model, IDS, bf16=bf16),
                                                       log_probs(with_fused_head(base), IDS, bf16=bf16)))
        values = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("spra_values")])
        sums = [torch.zeros(2, dtype=torch.float64) for _ in range(size)]
        dist.all_gather(sums, torch.stack([values.double().sum(), values.double().abs().sum()]))
        report[run] = [s.tolist() for s in sums]
        if rank == 0 and run == "dpo":
            torch.save(values, out / "dpo_values.pt")
    flags = [None] * size
    dist.all_gather_object(flags, report["reference_is_base"])
    report["reference_is_base"] = [f for fs in flags for f in fs]
    if rank == 0:
        (out / "world.json").write_text(json.dumps(report))
    shutdown()
    exit_rank(0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_models.py beside this file
    worker(Path(sys.argv[1]))
