"""A bitsandbytes 4-bit base (``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))``)
with SpaRA: the layer against a float64 dense reference, the packed data never written, training under engine none
(with and without autocast), DDP on 2 gloo ranks against one process, TRL's SFTTrainer, FSDP2 refused, the adapter
moving between the 4-bit and the bf16 base, and a merge that writes dequant(W) + Δ without requantizing.

Ran with bitsandbytes 0.50 (its CPU backend), transformers 5.25, trl 1.16 and torch 2.13.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

from dist_bnb_worker import SPRA, STEPS, VOCAB, fixed_batch, load_bnb, train  # noqa: E402

from spra_dist import apply_spra, load_adapter, save_adapter  # noqa: E402
from spra_dist.adapters.files import read_adapter  # noqa: E402
from spra_dist.core.model import spra_modules  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama saved in bf16 (what bitsandbytes quantizes on load, and what a merge rebuilds from), with a
    tokenizer for TRL."""
    import transformers as tf
    from tiny_models import tiny_tokenizer

    path = tmp_path_factory.mktemp("bnb_base")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> dict:
    """The 1-process run: the 4-bit base with SpaRA, ``STEPS`` AdamW steps on the whole fixed batch (engine none),
    its losses, the model (eval mode, read only) and its saved adapter."""
    model = apply_spra(load_bnb(base), SPRA)
    losses = train(model, fixed_batch(), engine="none")
    adapter = save_adapter(model, tmp_path_factory.mktemp("bnb_one") / "adapter")
    return {"model": model.eval(), "losses": losses, "adapter": adapter}


def logits(model, seed: int = 9) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-input-under-bf16-autocast"])
def test_layer_matches_a_dense_float64_layer_and_never_writes_the_packed_data(base, autocast):
    model = apply_spra(load_bnb(base), SPRA)
    m = spra_modules(model)[4][1]  # gate_proj: 128 x 64, held as a packed column
    assert m.quantization == "bnb-nf4" and m.weight_shape == (128, 64) and m.weight.shape == (128 * 64 // 4, 1)
    with torch.no_grad():
        m.spra_values.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    x_dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)).to(x_dtype).requires_grad_()
    g = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3))
    packed, absmax = m.weight.data.view(torch.uint8).clone(), m.weight.quant_state.absmax.clone()  # bytes: bf16 NaNs
    opt = torch.optim.AdamW([m.spra_values], lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)
    y.backward(g.to(y.dtype))
    assert y.dtype == torch.bfloat16 and x.grad.dtype == x_dtype and m.spra_values.grad.dtype == torch.float32

    w = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).double().view(-1)
    w[m.spra_indices.long()] += m.spra_values.detach().double()
    w = w.view(128, 64)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w.T
    y64.backward(g.double())
    dw_at_mask = (g.double().reshape(-1, 128).T @ x64.detach().reshape(-1, 64)).view(-1)[m.spra_indices.long()]
    for got, want in ((y, y64), (x.grad, x64.grad), (m.spra_values.grad, dw_at_mask)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-2, err  # bf16 rounding of x (under autocast), y and dY: 2.4e-3 to 3.5e-3 measured

    before = m.spra_values.detach().clone()
    opt.step()
    assert not torch.equal(m.spra_values.detach(), before)
    assert torch.equal(m.weight.data.view(torch.uint8), packed) and torch.equal(m.weight.quant_state.absmax, absmax)
    assert not m.weight.requires_grad and m.weight.grad is None


def test_trains_under_engine_none(trained):
    losses = trained["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_trains_under_bf16_autocast(base):
    model = apply_spra(load_bnb(base), SPRA)
    losses = train(model, fixed_batch(), engine="none", mixed_precision="bf16")
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_ddp_on_two_ranks_gives_the_one_process_adapter(base, trained, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_bnb_worker.py"), str(base), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "world.json").read_text())
    assert report["world_size"] == 2 and report["ranks_agree"]
    _, one = read_adapter(trained["adapter"])
    _, two = read_adapter(tmp_path / "adapter")
    assert one.keys() == two.keys()
    worst = max(((one[k] - two[k]).norm() / one[k].norm()).item() for k in one)
    assert worst < 1e-3, (worst, report)  # 1.8e-7 measured: each rank's bf16 forward is the whole batch's rows


@pytest.mark.slow
def test_trl_sft_trainer_trains_and_saves_the_adapter(base, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from spra_dist.integrations.hf import SpraAdapterCallback

    model = apply_spra(load_bnb(base), SPRA)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    texts = ["the colour of snow is white", "the colour of grass is green", "two plus two makes four",
             "three plus three makes six"]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, max_steps=4,
                     learning_rate=3e-2, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                     disable_tqdm=True, seed=0, dataset_num_proc=None)
    # The Trainer takes a 4-bit model only with trainable adapters attached (apply_spra marks them); TRL then casts
    # a 4-bit model's trainable parameters to bf16 (QLoRA's recipe), and the callback gives the values back fp32.
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts * 4}),
                         processing_class=AutoTokenizer.from_pretrained(base), callbacks=[SpraAdapterCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.float(), before[n])]
    assert sorted(moved) == sorted(before), "values that did not train"
    config, saved = read_adapter(tmp_path / "adapter")
    assert config["base_quantization"]["method"] == "bnb-nf4"
    assert all(m.spra_values.dtype == torch.float32 for _, m in spra_modules(model))  # fp32 master values
    for name, m in spra_modules(model):
        assert torch.equal(saved[f"{name}.spra_values"].float(), m.spra_values.detach().float()), name


def test_fsdp2_refuses_a_bitsandbytes_base(base):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from spra_dist.distributed.fsdp import apply_fsdp2
    from spra_dist.distributed.parallelize import parallelize

    model = apply_spra(load_bnb(base), SPRA)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with pytest.raises(ValueError, match="quantize_base=nf4"):
            apply_fsdp2(model)
        with pytest.raises(ValueError, match="quantize_base=nf4"):
            parallelize(model, engine="fsdp2", mixed_precision="bf16", make_optimizer=None, make_scheduler=None)
    finally:
        dist.destroy_process_group()
    assert all(type(p).__name__ != "DTensor" for p in model.parameters())  # refused before anything was sharded


def test_adapter_loads_onto_a_fresh_4bit_base_and_onto_the_bf16_base(base, trained):
    import transformers as tf

    fresh = load_adapter(load_bnb(base), trained["adapter"]).eval()
    assert torch.equal(logits(fresh), logits(trained["model"]))

    plain = load_adapter(tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), trained["adapter"])
    want = dict(spra_modules(trained["model"]))
    got = dict(spra_modules(plain))
    assert got.keys() == want.keys() and len(got) == 14
    for name, m in got.items():
        assert m.quantization is None and m.weight.dtype == torch.bfloat16
        assert m.k == want[name].k and torch.equal(m.spra_indices, want[name].spra_indices)
        assert torch.equal(m.spra_values, want[name].spra_values), name


def test_merge_writes_dequantized_weight_plus_delta_never_requantized(base, trained, tmp_path):
    import transformers as tf

    from spra_dist.adapters.export import merge_to_directory
    from spra_dist.core.quantized import merged_dense

    out = merge_to_directory(trained["adapter"], out=tmp_path / "merged", base=str(base))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    for name, m in spra_modules(trained["model"]):
        linear = merged.get_submodule(name)
        assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.bfloat16
        # dequant(W) from the 4-bit data the adapter trained on, the values added in fp32 and rounded once
        want = merged_dense(m.weight, m.spra_indices.long(), m.spra_values, torch.bfloat16)
        assert torch.equal(linear.weight, want), name
    # The same bf16 weights and the same ops: the merged model's logits are the 4-bit model's, bit for bit
    assert torch.equal(logits(merged), logits(trained["model"]))
