"""A 4-bit NF4 base (``quantize_base: nf4``): the layer against a float64 dense reference, the packed weight never
written, FSDP2 sharding and all-gathering the packed data on 2 gloo ranks, parity and resume against one process,
a merge that never requantizes, and the combinations refused before anything is written.

torchao tests FSDP2 over NF4 on CUDA only; these CPU checks ran with torchao 0.18 and torch 2.13 (constraints.txt).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")

from spra_dist import SpraConfig, apply_spra, load_adapter, merge_adapter, quantize_targets  # noqa: E402
from spra_dist.adapters.files import read_adapter  # noqa: E402
from spra_dist.core.model import spra_modules  # noqa: E402
from spra_dist.core.quantized import (  # noqa: E402
    check_engine,
    check_quantize_engine,
    dequantize,
    fill_nf4_rows,
    nf4_scaler_block,
    to_nf4,
)

ROOT = Path(__file__).resolve().parent.parent
DEBUG = str(ROOT / "configs/train/debug_tiny_llama.yaml")
COMMON = ["max_steps=4", "batch_size=8", "grad_accum=1", "log_every=1", "eval_every=0", "lr=1e-2",
          "max_grad_norm=null", "quantize_base=nf4"]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
LLAMA = dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, tie_word_embeddings=False)


def tiny_nf4_llama(dtype=torch.bfloat16, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).to(dtype)
    apply_spra(model, SpraConfig(lora_rank=4, seed=1))
    quantize_targets(model, "nf4")
    with torch.no_grad():
        for _, m in spra_modules(model):
            m.spra_values.normal_(0, 0.05, generator=torch.Generator().manual_seed(m.k))
    return model


def dense_reference(m) -> torch.Tensor:
    """dequant(W) + scatter(v), in float64."""
    w = dequantize(m.weight, torch.float64).view(-1)
    w[m.spra_indices.long()] += m.spra_values.detach().double()
    return w.view(m.weight_shape)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-input-under-bf16-autocast"])
def test_layer_matches_a_dense_float64_layer(autocast):
    m = spra_modules(tiny_nf4_llama())[4][1]  # gate_proj: 256 x 128
    x_dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2)).to(x_dtype).requires_grad_()
    g = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)
    y.backward(g.to(y.dtype))
    assert y.dtype == torch.bfloat16 and x.grad.dtype == x_dtype and m.spra_values.grad.dtype == torch.float32

    w = dense_reference(m)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w.T
    y64.backward(g.double())
    dw_at_mask = (g.double().reshape(-1, 256).T @ x64.detach().reshape(-1, 128)).view(-1)[m.spra_indices.long()]
    for got, want in ((y, y64), (x.grad, x64.grad), (m.spra_values.grad, dw_at_mask)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-2, err  # bf16 rounding of x (under autocast), y and dY; the reference keeps float64


def test_the_packed_weight_is_never_written():
    model = tiny_nf4_llama()
    parts = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
    before = {n: [getattr(m.weight, a).clone() for a in parts] for n, m in spra_modules(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, m in spra_modules(model):
        assert all(torch.equal(a, getattr(m.weight, p)) for a, p in zip(before[n], parts, strict=True)), n
        assert not m.weight.requires_grad


def test_only_the_adapted_linears_are_packed_at_under_0_3_of_bf16():
    model = tiny_nf4_llama()
    packed = [n for n, p in model.named_parameters() if type(p).__name__ == "NF4Tensor"]
    assert len(packed) == 14 and all(n.endswith("_proj.weight") for n in packed)
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    for _, m in spra_modules(model):
        w = m.weight
        held = sum(t.nbytes for t in (w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean,
                                      w.nf4))
        assert held <= 0.3 * w.numel() * 2, (held, w.numel() * 2)


def test_rows_of_the_packed_matrix_are_the_packed_rows():
    """What a rank loads (the whole matrix packed, its rows kept) is what splitting the packed matrix gives: the
    double quantization's scales never span two rows, so FSDP2's row shards cut every packed part cleanly."""
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert nf4_scaler_block((96, 576)) == 9  # 576 / 64 = 9 blocks a row
    whole = to_nf4(w)
    for rows in ((0, 48), (48, 96)):
        shard = to_nf4(torch.zeros(rows[1] - rows[0], 576, dtype=torch.bfloat16))
        fill_nf4_rows(shard, w, rows)
        assert torch.equal(shard.get_original_weight(), whole.get_original_weight()[rows[0]:rows[1]])


def test_merge_writes_dequantized_weight_plus_delta():
    """merge_adapter over NF4: plain linears holding dequant(W) + Δ (added in fp32, rounded once to bf16), giving the
    adapter model's logits; an in-place merge of a packed weight is refused."""
    model = tiny_nf4_llama().eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="never written"):
        spra_modules(model)[0][1].merge()
    merge_adapter(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_combinations_refused_with_the_fix_named():
    model = tiny_nf4_llama()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_targets(model, "nf4")
    with pytest.raises(ValueError, match="engine=fsdp2"):
        check_engine(model, engine="deepspeed", zero_stage=2)
    with pytest.raises(ValueError, match="engine=none"):
        check_engine(model, engine="fsdp2", world_size=1)
    with pytest.raises(ValueError, match="rows evenly"):
        check_engine(model, engine="fsdp2", world_size=3)
    with pytest.raises(ValueError, match="fsdp2"):
        check_quantize_engine("nf4", engine="deepspeed")
    from tiny_models import tiny_gpt2

    gpt2 = apply_spra(tiny_gpt2(), SpraConfig(lora_rank=2, seed=1))
    with pytest.raises(ValueError, match="Conv1D"):
        quantize_targets(gpt2, "nf4")


def cli(out: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    train = ["-m", "spra_dist", "train", "--config", DEBUG, f"output_dir={out}", *COMMON, *args]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, *train], capture_output=True, text=True, env=ENV, timeout=300,
                          cwd=ROOT)


def trained(out: Path, *args: str, nproc: int = 1) -> dict:
    proc = cli(out, *args, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def rel_diff(a: Path, b: Path) -> float:
    _, x = read_adapter(a / "adapter")
    _, y = read_adapter(b / "adapter")
    assert x.keys() == y.keys()
    return max(((x[k] - y[k]).norm() / x[k].norm()).item() for k in x)


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory) -> Path:
    """A tiny Llama saved in bf16 with a tokenizer: the base spra train loads (whole, or on meta under FSDP2)."""
    import transformers as tf
    from tiny_models import tiny_tokenizer

    path = tmp_path_factory.mktemp("nf4_base")
    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**LLAMA, "hidden_size": 64, "intermediate_size": 128}, max_position_embeddings=128,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def on_base(saved_base: Path) -> list[str]:
    return ["model.source=hf", f"model.name_or_path={saved_base}", "model.dtype=bfloat16"]


@pytest.fixture(scope="module")
def one_process(saved_base, tmp_path_factory) -> tuple[Path, dict]:
    """The reference: 4 steps in one process, which loads the base whole and packs it."""
    out = tmp_path_factory.mktemp("nf4_one") / "one"
    return out, trained(out, *on_base(saved_base), "engine=none")


@pytest.mark.slow
def test_fsdp2_on_two_ranks_gives_the_one_process_adapter(saved_base, one_process, tmp_path):
    """bf16 over NF4: FSDP2 on 2 ranks builds the base on meta, and each rank packs every matrix and keeps its rows.
    Then ``spra merge`` of the run: bf16 logits equal the adapter's over the packed base."""
    (ref, one) = one_process
    two = trained(tmp_path / "two", *on_base(saved_base), "engine=fsdp2", nproc=2)
    assert two["world_size"] == 2 and abs(one["eval_loss_after"] - two["eval_loss_after"]) < 1e-3
    assert rel_diff(ref, tmp_path / "two") < 1e-4  # 9e-9 measured
    record = json.loads((tmp_path / "two" / "adapter" / "adapter_config.json").read_text())["base_quantization"]
    assert record == {"method": "nf4", "dtype": "bfloat16", "block_size": 64}

    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "spra_dist", "merge", "--adapter", str(tmp_path / "two" / "adapter"),
                           "--out", str(merged)], capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import transformers as tf

    plain = tf.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # dense, never requantized
    adapted = tf.AutoModelForCausalLM.from_pretrained(saved_base, dtype=torch.bfloat16)
    load_adapter(adapted, tmp_path / "two" / "adapter")
    quantize_targets(adapted, "nf4")  # the base the adapter was trained on
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits)


@pytest.mark.slow
def test_fsdp2_all_gathers_the_packed_weights(tmp_path):
    """One block's all-gather on 2 ranks, counted at torch.distributed: the bf16 run's bytes with each adapted weight's
    bf16 shard replaced by its NF4 shard (data, one int8 scale per 64 values, one bf16 factor per scale block)."""
    out = tmp_path / "ag.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_nf4_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    shapes = [(128, 128)] * 4 + [(256, 128)] * 2 + [(128, 256)]  # q, k, v, o, gate, up, down
    bf16 = sum(r * c * 2 for r, c in shapes) // 2
    nf4 = sum(r * c // 2 + r * c // 64 + r * c // 64 // nf4_scaler_block((r, c)) * 2 for r, c in shapes) // 2
    assert got["none"]["counted"] == got["none"]["expected"]
    assert got["nf4"]["counted"] == got["nf4"]["expected"] == got["none"]["counted"] - bf16 + nf4
    assert nf4 <= 0.3 * bf16  # 0.265 here: at real widths a scale block covers up to 256 x 64 values, 0.258
    assert torch.isfinite(torch.tensor(got["nf4"]["out"])).all()


@pytest.mark.slow
def test_resume_on_two_ranks_then_one_process(saved_base, one_process, tmp_path):
    """Stopped after 2 of 4 steps under FSDP2 on 2 ranks, resumed in one process over the packed base, the run ends
    with the uninterrupted adapter; the checkpoint is O(k)."""
    (ref, one) = one_process
    part = tmp_path / "part"
    trained(part, *on_base(saved_base), "engine=fsdp2", "stop_after=2", "checkpoint_every=2", nproc=2)
    state = part / "checkpoints" / "step-00000002" / "state.safetensors"
    assert state.stat().st_size < 3 * one["k_total"] * 4 + 64 * 1024
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "checkpoints").symlink_to(part / "checkpoints")
    resumed = trained(out, *on_base(saved_base), "engine=none", "resume=auto")
    assert resumed["resumed_from_step"] == 2
    assert rel_diff(ref, out) < 1e-4


@pytest.mark.slow
def test_a_base_saved_quantized_is_refused_before_anything_is_written(tmp_path, capsys):
    """spra train on a checkpoint saved with bitsandbytes 4-bit: packing it again, or sharding it under FSDP2, gets one
    error line and exit 2, and no output directory."""
    pytest.importorskip("bitsandbytes", reason="the quant extra (bitsandbytes) is not installed")
    import transformers as tf
    from tiny_models import tiny_tokenizer

    from spra_dist.cli import main

    config = tf.LlamaConfig(**{**LLAMA, "hidden_size": 64, "intermediate_size": 128}, pad_token_id=0)
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    q4 = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16)
    tf.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=q4,
                                            dtype=torch.bfloat16).save_pretrained(tmp_path / "q4")
    tiny_tokenizer().save_pretrained(tmp_path / "q4")
    capsys.readouterr()
    for extra, words in ((["quantize_base=nf4"], "already quantized"), (["engine=fsdp2"], "set quantize_base=nf4")):
        out = tmp_path / "out"
        code = main(["train", "--config", DEBUG, f"output_dir={out}", "model.source=hf",
                     f"model.name_or_path={tmp_path / 'q4'}", *extra])
        err = capsys.readouterr().err
        assert code == 2 and words in err and err.startswith("error: "), err
        assert not out.exists()
