"""Smoke test of the benchmark's pieces (the benchmark itself runs with ``python -m bench.run_all``)."""

import os

import pytest

pytest.importorskip("peft")

from bench import report  # noqa: E402
from bench._worker import run  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spra", "dense_grad", "floor"])
def test_worker_one_tiny_step(method, monkeypatch):
    monkeypatch.setenv("SPRA_CPU_KERNEL", "unset")  # the worker pins its CPU path in this process: restore it after
    out = run(method, "smollm2", layers=1, batch=1, seq=8, steps=1, warmup=0)
    assert len(out["step_s"]) == 1 and out["peak_rss"] > 0
    assert out["trainable"] == (0 if method == "floor" else 8 * (2 * 1152 + 2 * 768 + 3 * 2112))


@pytest.mark.parametrize("method", ["spra", "spra_cpp", "lora", "floor"])
def test_worker_bf16_autocast_step_pins_its_cpu_path(method, monkeypatch):
    monkeypatch.setenv("SPRA_CPU_KERNEL", "unset")  # restored after the test, whatever the worker sets
    out = run(method, "minilm", layers=1, batch=1, seq=8, steps=1, warmup=0, autocast="bf16")
    assert out["autocast"] == "bf16" and len(out["step_s"]) == 1
    assert out["trainable"] == (0 if method == "floor" else 8 * (4 * 768 + 2 * 1920))  # MiniLM: q k v o, in, out
    assert os.environ["SPRA_CPU_KERNEL"] == {"spra": "0", "spra_cpp": "1"}.get(method, "unset")


def test_targets_name_each_figure_and_whether_it_holds():
    def row(median_s, rss):
        return {"median_s": median_s, "peak_rss": rss}

    steps = [{"model": "smollm2", "layers": 2, "autocast": None, "methods": {
        "spra": row(1.0, 103), "spra_cpp": row(0.9, 102), "lora": row(1.0, 110), "floor": row(0.9, 100)}},
        {"model": "minilm", "layers": 6, "autocast": "bf16", "methods": {
            "spra": row(2.0, 1), "lora": row(2.2, 1), "floor": row(2.0, 1)}}]
    lines = report.target_lines(steps, [{"model": "llama3-70b", "budget": "r8", "seconds": 4.2}], [])
    assert lines[0] == ("- smollm2 L2, spra_dist (sampled_addmm): step 1.00 × LoRA (≤ 0.95: **does not hold**), "
                        "1.11 × floor (≤ 1.05: **does not hold**), peak RSS 1.030 × floor (≤ 1.03: holds)")
    assert lines[1] == ("- smollm2 L2, spra_dist (C++ kernel): step 0.90 × LoRA (≤ 0.95: holds), 1.00 × floor "
                        "(≤ 1.05: holds), peak RSS 1.020 × floor (≤ 1.03: holds)")
    assert lines[2] == ("- minilm L6 bf16, spra_dist (sampled_addmm): step 0.91 × LoRA (≤ 0.95: holds), 1.00 × "
                        "floor (≤ 1.05: holds)")
    assert lines[3] == "- mask rebuild llama3-70b r8: 4.20 s (≤ 5 s: holds)"


def test_report_keeps_hand_written_text(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text(f"# notes\n\n{report.BEGIN}\nold\n{report.END}\n\ntail\n")
    report.write(doc, ["new table"])
    assert doc.read_text() == f"# notes\n\n{report.BEGIN}\nnew table\n{report.END}\n\ntail\n"


@pytest.mark.slow
def test_profile_step_table_has_every_shape_and_part():
    from bench import profile_step

    text = profile_step.table(tokens=64, dtypes=["float32", "bfloat16"], repeats=1)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "×" in line and "shape" not in line]
    assert len(rows) == 2 * len(profile_step.SHAPES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 1 + len(profile_step.COLUMNS) + 2
        frozen, *_ = (float(c) for c in cells[1:3])
        assert frozen > 0 and float(cells[-2]) > 1.0  # an adapted layer costs more than the frozen one


def test_compile_table_compares_each_method_with_lora_and_the_floor():
    from bench import compile_speed

    def res(method, eager, compiled):
        return {"method": method, "eager_median_s": eager, "compiled_median_s": compiled,
                "speedup": eager / compiled, "first_compiled_step_s": 30.0, "load_before": 1.0}

    lines = compile_speed.table([res("spra", 1.2, 1.0), res("lora", 1.1, 1.25), res("floor", 1.0, 0.8)])
    assert lines[2] == "| spra_dist | 1.200 | 1.000 | 1.20× | 30.0 | 0.80 | 1.25 | 1.0 |"
    assert lines[4].startswith("| floor (all frozen) | 1.000 | 0.800 | 1.25× |")


def test_chart_draws_configs_with_different_methods(tmp_path):
    def res(model, methods, autocast=None):
        return {"model": model, "layers": 2, "autocast": autocast,
                "methods": {m: {"median_s": 1.0 + i, "peak_rss": 2**30} for i, m in enumerate(methods)}}

    steps = [res("smollm2", ["spra", "spra_cpp", "lora", "shira", "floor"]), res("minilm", ["spra", "lora", "floor"]),
             res("minilm", ["spra", "floor"], autocast="bf16")]
    report.chart(steps, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def test_model_profile_counts_the_spra_ops_of_every_layer(monkeypatch):
    from bench import profile_model

    monkeypatch.setenv("SPRA_CPU_KERNEL", "0")  # restored after the test (measure pins the path it runs)
    out = profile_model.measure("spra", "minilm", layers=1, batch=1, seq=8, steps=1, warmup=0)
    ops = out["ops_ms"]
    assert set(ops) == set(profile_model.OPS) and all(v > 0 for v in ops.values()) and out["step_ms"] > 0
    floor = {**out, "method": "floor", "step_ms": out["step_ms"] - 5, "ops_ms": dict.fromkeys(ops, 0.0)}
    lines = profile_model.table([out, floor])
    assert lines[2].startswith(f"| spra | {out['step_ms']:.0f} | +5 | {ops['spra_dist::linear']:.0f} |")
    assert lines[3].startswith(f"| floor | {floor['step_ms']:.0f} | +0 | – | – | – |")


def test_quantized_memory_nf4_base_holds_under_a_third_of_bf16(tmp_path):
    """bench.quantized_memory's arms on a tiny Llama checkpoint: the same trainable count at the r=8 budget, and the
    adapted linears' frozen weights counted in full, NF4 and bitsandbytes 4-bit each under 0.3 × bf16."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    import torch

    from bench import quantized_memory as qm

    model_dir = qm.tiny_checkpoint(tmp_path)  # hidden 128, MLP 256, 2 layers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits on a busy machine
    try:
        results = [qm.measure(arm, model_dir, batch=2, seq=16, steps=1, warmup=0)
                   for arm in ("spra_bf16", "spra_nf4", "lora_bnb4")]
    finally:
        torch.set_num_threads(threads)
    bf16, nf4, lora = results
    values = 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)  # q o, k v, gate up down; 2 layers
    assert bf16["weights"] == {"held": 2 * values, "bf16": 2 * values, "values": values}
    assert nf4["weights"]["values"] == lora["weights"]["values"] == values
    assert 0.25 * 2 * values < nf4["weights"]["held"] < 0.3 * bf16["weights"]["held"]  # 4 bits + scales + tables
    assert 0.25 * 2 * values < lora["weights"]["held"] < 0.3 * bf16["weights"]["held"]
    # r · (n_in + n_out) per matrix, SpaRA and LoRA alike
    assert bf16["trainable"] == nf4["trainable"] == lora["trainable"] == 2 * 8 * (2 * 256 + 2 * 192 + 3 * 384)
    for r in results:  # the steps' own peak (VmHWM reset once the model is built) covers what the model holds
        assert len(r["step_s"]) == 1 and r["rss_built"] > 0, r
        assert r["step_peak_rss"] is None or r["step_peak_rss"] >= r["rss_built"] - 4 * 2**20, r
    rows = [qm.combine([r]) for r in results]
    lines = qm.table(rows)
    assert len(lines) == 2 + 3 and lines[3].startswith(f"| SpaRA, NF4 base (torchao) | {nf4['trainable']:,} | ")
    assert qm.target_line(rows).startswith(f"NF4 weights held {nf4['weights']['held'] / (2 * values):.3f} × bf16's "
                                              f"(≤ 0.3: holds)")


def test_rl_reference_trl_holds_a_second_model_and_spra_none(tmp_path):
    """bench.rl_reference's four arms on a tiny Llama checkpoint, one step each: TRL's GRPOTrainer and DPOTrainer
    reload the whole model as their reference, SpraGRPOTrainer and SpraDPOTrainer hold no parameters for it."""
    pytest.importorskip("trl")
    import torch
    from tiny_models import tiny_llama, tiny_tokenizer

    from bench import rl_reference as rl

    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    base = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits on a busy machine
    try:
        results = [rl.measure(arm, str(tmp_path), steps=1) for arm in rl.ARMS]
    finally:
        torch.set_num_threads(threads)
    by = {r["arm"]: r for r in results}
    for name in ("grpo", "dpo"):
        trl, spra = by[f"{name}_trl"], by[f"{name}_spra"]
        assert trl["base_params"] == spra["base_params"] == base
        assert (trl["ref_params"], trl["ref_type"]) == (base, "LlamaForCausalLM")  # a whole second model
        assert (spra["ref_params"], spra["ref_type"]) == (0, "BaseReference")
    for r in results:
        assert len(r["step_s"]) == 1 and r["rss_built"] >= r["rss_model"] - 4 * 2**20 > 0, r
        assert r["step_peak_rss"] is None or r["step_peak_rss"] >= r["rss_built"] - 4 * 2**20, r
    lines = rl.table([rl.combine([r]) for r in results])
    assert len(lines) == 2 + 2
    assert lines[2].startswith(f"| GRPO | {base:,} / 0 | ") and lines[3].startswith(f"| DPO | {base:,} / 0 | ")
