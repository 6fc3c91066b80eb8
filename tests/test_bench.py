"""Smoke test of the benchmark's pieces (the benchmark itself runs with ``python -m bench.run_all``)."""

import pytest

pytest.importorskip("peft")

from bench import report  # noqa: E402
from bench._worker import run  # noqa: E402


@pytest.mark.parametrize("method", ["spra", "dense_grad", "floor"])
def test_worker_one_tiny_step(method):
    out = run(method, "smollm2", layers=1, batch=1, seq=8, steps=1, warmup=0)
    assert len(out["step_s"]) == 1 and out["peak_rss"] > 0
    assert out["trainable"] == (0 if method == "floor" else 8 * (2 * 1152 + 2 * 768 + 3 * 2112))


def test_report_keeps_hand_written_text(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text(f"# notes\n\n{report.BEGIN}\nold\n{report.END}\n\ntail\n")
    report.write(doc, ["new table"])
    assert doc.read_text() == f"# notes\n\n{report.BEGIN}\nnew table\n{report.END}\n\ntail\n"


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
