"""The quality study's harness (``bench.quality``): a smoke-size study runs each cell in its own process, appends
its result to the JSONL, skips finished cells on a rerun, runs only what ``--only`` names, and writes a report and
plot that carry the JSONL's numbers. The study itself runs with ``make quality``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

from bench import quality, quality_report  # noqa: E402
from bench.quality_cell import parse, prepare, run  # noqa: E402
from spra_dist.core.model import spra_modules  # noqa: E402
from spra_dist.train.config import ModelConfig  # noqa: E402
from spra_dist.train.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPRA, LORA = "cls/spra_r8/lr=0.001/seed=0", "cls/lora_r8/lr=0.001/seed=0"
MINILM_R8 = 8 * (6 * (4 * (384 + 384) + 2 * (384 + 1536)) + 384 + 384)  # 37 linears: 6 layers and the pooler


def study(out: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "bench.quality", "--smoke", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_smoke_study_appends_resumes_filters_and_reports(tmp_path):
    jsonl = tmp_path / "quality.jsonl"
    out = study(tmp_path, "--only", "cls/spra_r8")
    assert [json.loads(line)["id"] for line in jsonl.read_text().splitlines()] == [SPRA]
    assert f"run  {SPRA}" in out and "lora" not in out

    first = jsonl.read_text() + '{"id": "cls/lora_r8/lr=0.001/se'  # a record cut short by a kill mid-write
    jsonl.write_text(first)
    out = study(tmp_path, "--only", "cls/spra_r8,cls/lora_r8")
    assert f"skip {SPRA}" in out and f"run  {SPRA}" not in out and f"run  {LORA}" in out
    text = jsonl.read_text()
    assert text.startswith(first + "\n") and len(text.splitlines()) == 3  # appended on a line of its own

    out = study(tmp_path, "--only", "cls/spra_r8,cls/lora_r8")
    assert "run " not in out and jsonl.read_text() == text  # nothing rerun, nothing appended

    spra, lora = (json.loads(line) for line in text.splitlines()[::2])
    assert spra["pid"] != lora["pid"]  # a fresh process per cell
    assert "-m bench.quality_cell --task cls --method spra --rank 8" in spra["command"]
    assert spra["adapted"] == lora["adapted"] == MINILM_R8 and spra["trainable"] == lora["trainable"] == MINILM_R8 + 770
    assert spra["sizes"] == {"train": 48, "val": 16, "test": 16} and spra["wall_s"] > spra["train_s"] > 0

    md = (tmp_path / "quality.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| SpaRA r=8 |"))
    assert f"| {spra['trainable']:,} | 0.001 | {100 * spra['test']['accuracy']:.1f} (n=1) |" in row
    assert f"{100 * spra['val']['accuracy']:.1f} (n=1) | {spra['test']['eval_loss']:.3f} (n=1)" in row
    diff = 100 * (spra["test"]["accuracy"] - lora["test"]["accuracy"])
    assert f"SpaRA − LoRA = {diff:+.2f} points" in md
    assert f"**0.001 → {100 * spra['val']['accuracy']:.1f}% / {spra['val']['eval_loss']:.3f}**" in md
    assert "| SpaRA r=4 | – | grid 0 of 1 rates |" in md
    png = (tmp_path / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    (tmp_path / "quality.md").unlink()
    out = study(tmp_path, "--report")  # from the JSONL alone: the same page, nothing run
    assert "run " not in out and (tmp_path / "quality.md").read_text() == md


@pytest.mark.slow
def test_only_refuses_a_pattern_that_matches_no_cell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.quality", "--smoke", "--out", str(tmp_path), "--only",
                           "cls/spra_r9"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--only 'cls/spra_r9' matches no cell" in proc.stderr
    assert not (tmp_path / "quality.jsonl").exists()


def test_vo_placement_gets_the_total_k_of_all_linears():
    model = prepare(build_model(ModelConfig(source="minilm", task="classification"), seed=0).model, task="cls",
                    method="spra", rank=8, targets="vo", seed=0)
    ks = {name: m.spra_values.numel() for name, m in spra_modules(model)}
    assert len(ks) == 12 and all(n.endswith(("attention.self.value", "attention.output.dense")) for n in ks)
    assert sum(ks.values()) == MINILM_R8 and set(ks.values()) == {MINILM_R8 // 12}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        *(f"{n}.spra_values" for n in ks), "classifier.weight", "classifier.bias"}


def fake(arm: quality.Arm, lr: float, seed: int, acc: float, loss: float = 0.5) -> dict:
    return {"id": quality.cell_id(arm, lr, seed), "arm": arm.name, "task": arm.task, "lr": lr, "seed": seed,
            "val": {"accuracy": acc, "eval_loss": loss}}


def test_rate_is_chosen_on_validation_with_seed_0_then_the_other_seeds_run_at_it():
    arm, scale = quality.Arm("spra_r8", "cls", "spra", (1e-3, 3e-3, 1e-2), rank=8), quality.FULL["cls"]
    records = [fake(arm, 1e-3, 0, 0.70), fake(arm, 3e-3, 0, 0.80, loss=0.6)]
    assert quality.choose_lr(arm, scale, records) is None and quality.later_seeds(arm, scale, records) == []
    records.append(fake(arm, 1e-2, 0, 0.80, loss=0.4))  # a tie on accuracy goes to the lower loss
    records.append({**fake(arm, 3e-3, 1, 0.99), "test": {"accuracy": 1.0}})  # other seeds never choose
    # The best sits at the top of the grid: the next rate up runs before anything is chosen.
    assert quality.grid(arm, scale, records) == (1e-3, 3e-3, 1e-2, 3e-2)
    assert quality.choose_lr(arm, scale, records) is None and quality.later_seeds(arm, scale, records) == []
    records.append(fake(arm, 3e-2, 0, 0.75))
    assert quality.grid(arm, scale, records) == (1e-3, 3e-3, 1e-2, 3e-2)  # no longer at an edge: done
    assert quality.choose_lr(arm, scale, records) == 1e-2
    assert quality.later_seeds(arm, scale, records) == [(1e-2, 1), (1e-2, 2)]
    sft = quality.Arm("lora_r8", "sft", "lora", (1e-4, 3e-4, 1e-3), rank=8)
    assert quality.choose_lr(sft, quality.FULL["sft"], [fake(sft, 1e-4, 0, 0, loss=0.3), fake(
        sft, 3e-4, 0, 0, loss=0.2), fake(sft, 1e-3, 0, 0, loss=0.25)]) == 3e-4  # SFT: the lowest loss


def test_grid_grows_past_an_edge_at_most_extend_times_and_not_in_the_smoke_study():
    arm, scale = quality.Arm("lora_r4", "cls", "lora", (1e-3, 3e-3, 1e-2), rank=4), quality.FULL["cls"]
    records = [fake(arm, 1e-3, 0, 0.80), fake(arm, 3e-3, 0, 0.78), fake(arm, 1e-2, 0, 0.70)]
    assert quality.grid(arm, scale, records) == (3e-4, 1e-3, 3e-3, 1e-2)
    records += [fake(arm, 3e-4, 0, 0.81), fake(arm, 1e-4, 0, 0.82)]
    assert quality.EXTEND == 2 and quality.grid(arm, scale, records) == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    assert quality.choose_lr(arm, scale, records) == 1e-4  # still the edge, but the grid has grown EXTEND times
    row = quality.rows([arm], quality.FULL, records)[0]
    assert "grid grown by 2; still at an edge after 2 extensions" in "".join(quality_report.lr_table([row]))
    quality.check_only(["cls/lora_r4/lr=0.0001/seed=0"], [arm], quality.FULL, records)  # a grown rate is a cell
    with pytest.raises(ValueError, match="matches no cell"):
        quality.check_only(["cls/lora_r4/lr=0.0001/seed=0"], [arm], quality.FULL, [])
    assert quality.grid(arm, quality.SMOKE["cls"], records) == (1e-3,)
    assert [quality.beyond(lr, up) for lr, up in [(3e-3, True), (1e-2, True), (1e-3, False), (3e-5, False)]] == [
        1e-2, 3e-2, 3e-4, 1e-5]
    with pytest.raises(ValueError, match="0.002 is not on the 1-3-10 ladder"):
        quality.beyond(2e-3, up=True)


def test_only_patterns_and_a_line_cut_short(tmp_path):
    assert quality.selected(SPRA, ["cls"]) and quality.selected(SPRA, ["cls/spra_r8"])
    assert quality.selected(SPRA, ["cls/*/seed=0"]) and not quality.selected(SPRA, ["cls/spra_r4", "sft"])
    assert not quality.selected(SPRA, ["cls/spra"])  # an arm's name is matched whole, not as a prefix
    path = tmp_path / "quality.jsonl"
    path.write_text(json.dumps({"id": SPRA}) + "\n" + '{"id": "cls/lo')
    assert [r["id"] for r in quality.read_records(path)] == [SPRA]


@pytest.mark.slow
def test_sft_cell_trains_and_scores_greedy_answers(tmp_path):
    out = run(parse(["--task", "sft", "--method", "spra", "--rank", "8", "--lr", "0.005", "--steps", "1", "--batch",
                     "2", "--warmup", "1", "--max-length", "96", "--train", "8", "--val", "2", "--test", "2",
                     "--generate", "1", "--data-dir", str(tmp_path / "dates")]))
    assert out["trainable"] == out["adapted"] == 2_442_240  # SmolLM2-135M, 210 linears at the r=8 budget
    assert out["sizes"] == {"train": 8, "val": 2, "test": 2} and out["head_lr"] is None
    assert out["val"]["eval_loss"] > 0 and out["test"]["generated"] == 1 and 0 <= out["test"]["exact_match"] <= 1


def test_density_allocation_spreads_the_same_total_k_over_all_linears():
    model = prepare(build_model(ModelConfig(source="minilm", task="classification"), seed=0).model, task="cls",
                    method="spra", rank=8, targets="all", seed=0, alloc="density")
    ks = {name: m.spra_values.numel() for name, m in spra_modules(model)}
    sizes = {name: m.weight.numel() for name, m in spra_modules(model)}
    assert len(ks) == 37 and abs(sum(ks.values()) - MINILM_R8) <= 37  # one density, each k rounded
    density = MINILM_R8 / sum(sizes.values())
    assert all(abs(ks[n] - density * sizes[n]) <= 1 for n in ks)
    assert ks["bert.encoder.layer.0.intermediate.dense"] > 8 * (384 + 1536)  # FFN gains what attention gives up
    assert ks["bert.encoder.layer.0.attention.self.query"] < 8 * (384 + 384)


def probe_row(arm: quality.Arm, accs: list[float]) -> list[dict]:
    return [{**fake(arm, quality.PROBE_LR, s, a), "test": None, "wall_s": 1.0} for s, a in enumerate(accs)]


@pytest.mark.slow
def test_probes_change_one_setting_score_on_validation_only_and_are_reported(tmp_path):
    probe = next(a for a in quality.ARMS if a.name == "spra_r4_warmup0")
    cmd = quality.command(probe, quality.FULL["cls"], quality.PROBE_LR, 1)
    a = parse(cmd[3:])  # the scale's --warmup 8 comes first; the probe's --warmup 0 overrides it
    assert (a.warmup, a.no_test, a.rank, a.lr, a.seed) == (0, True, 4, quality.PROBE_LR, 1)
    assert all(arm.part != "probe" or arm.change or arm.lrs != (quality.PROBE_LR,) for arm in quality.ARMS)
    rate = next(a for a in quality.ARMS if a.name == "spra_r4_lr5e-3")  # the rate probe: its lr is the change
    assert parse(quality.command(rate, quality.FULL["cls"], 5e-3, 0)[3:]).lr == 5e-3
    assert quality_report.probe_change(rate, warmup=8, lr=3e-3) == "peak learning rate 0.005 (study: 0.003)"

    out = run(parse(["--task", "cls", "--method", "spra", "--rank", "4", "--lr", "0.003", "--steps", "1", "--batch",
                     "4", "--warmup", "0", "--max-length", "16", "--train", "8", "--val", "4", "--test", "4",
                     "--weight-decay", "0.1", "--alloc", "density", "--no-test"]))
    assert out["test"] is None and out["sizes"]["test"] == 0 and 0 <= out["val"]["accuracy"] <= 1
    assert (out["warmup"], out["weight_decay"], out["alloc"]) == (0, 0.1, "density")

    base, lora = (quality.Arm(n, "cls", m, (1e-3, 3e-3, 1e-2), rank=4) for n, m in (("spra_r4", "spra"),
                                                                                   ("lora_r4", "lora")))
    records = [{**fake(base, 3e-3, s, acc), "test": {"accuracy": 0.8, "eval_loss": 0.5}, "wall_s": 1.0}
               for s, acc in enumerate((0.76, 0.78, 0.77))] + [fake(base, lr, 0, 0.7) for lr in (1e-3, 1e-2)]
    records += [{**fake(lora, 3e-3, s, acc), "test": {"accuracy": 0.81, "eval_loss": 0.5}, "wall_s": 1.0}
                for s, acc in enumerate((0.79, 0.79, 0.79))] + [fake(lora, lr, 0, 0.7) for lr in (1e-3, 1e-2)]
    records += probe_row(probe, [0.80, 0.79, 0.78])
    arms = [base, lora, probe]
    rows = quality.rows(arms, quality.FULL, records)
    assert rows[2]["chosen"] == quality.PROBE_LR and len(rows[2]["final"]) == 3
    by = {r["arm"].name: r for r in rows}
    md = "\n".join(quality_report.probe_table([by["spra_r4_warmup0"]], by["spra_r4"], by["lora_r4"], 8))
    assert "| spra_r4_warmup0 | warmup 0 steps (study: 8) | 79.0 ± 1.0 (n=3) |" in md and "| +2.00 |" in md
    assert "| LoRA r=4 at its chosen rate | – | 79.0 ± 0.0 (n=3) |" in md
    assert "| SpaRA r=4 at 0.003 | – | 77.0 ± 1.0 (n=3) |" in md


def test_refined_r4_grid_keeps_the_probes_base_at_the_rate_they_changed_from():
    """SpaRA r=4 chooses again on its refined grid; the probes still compare with its cells at PROBE_LR."""
    spra = next(a for a in quality.ARMS if a.name == "spra_r4")
    assert 5e-3 in spra.lrs and quality.PROBE_BASE.lrs == (quality.PROBE_LR,)
    records = [fake(spra, lr, 0, acc) for lr, acc in zip(spra.lrs, (0.70, 0.76, 0.79, 0.72), strict=True)]
    records += [{**fake(spra, lr, s, acc), "test": {"accuracy": 0.8, "eval_loss": 0.5}}
                for lr in (3e-3, 5e-3) for s, acc in ((1, 0.75), (2, 0.77))]
    rows = quality.rows([spra, quality.PROBE_BASE], quality.FULL, records)
    assert rows[0]["chosen"] == 5e-3 and [r["lr"] for r in rows[0]["final"]] == [5e-3] * 3
    assert rows[1]["chosen"] == 3e-3 and [r["val"]["accuracy"] for r in rows[1]["final"]] == [0.76, 0.75, 0.77]
