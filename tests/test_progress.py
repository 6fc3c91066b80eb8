"""What a run prints while it trains: a bar on a terminal, a plain line now and then in a log file."""

from __future__ import annotations

import io

from tiny_run import CONFIG as DEBUG

from spra_dist.cli import main
from spra_dist.train import progress as progress_mod
from spra_dist.train.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_a_line_per_tenth_of_the_run():
    out = io.StringIO()
    bar = progress(range(100, 200), desc="train", stream=out)
    assert isinstance(bar, LineProgress)
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert lines[0].startswith("train step 110/200 (55%) loss=0.0091 elapsed 0:00:00 eta 0:00:00")
    assert lines[-1].startswith("train step 200/200 (100%)")


def test_a_log_file_gets_a_line_every_so_many_seconds(monkeypatch):
    clock = iter(range(0, 1000, 20))  # 20 s a step; lines every 30 s, so every second step
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    for _ in progress(range(0, 1000), desc="train", stream=out):
        if len(out.getvalue().splitlines()) == 3:
            break
    assert [line.split(" elapsed")[0] for line in out.getvalue().splitlines()] == [
        "train step 2/1000 (0%)", "train step 4/1000 (0%)", "train step 6/1000 (0%)"]
    assert out.getvalue().splitlines()[0].endswith("elapsed 0:00:40 eta 5:32:40")


def test_a_terminal_gets_the_bar_and_other_ranks_nothing():
    term = Terminal()
    for _ in progress(range(3), desc="train", stream=term):
        pass
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()
    quiet = io.StringIO()
    for _ in progress(range(3), desc="train", stream=quiet, enabled=False):
        pass
    assert quiet.getvalue() == ""


def test_train_redirected_prints_lines_not_a_bar(tmp_path, capsys):
    """stderr is not a terminal under pytest, as in ``spra train ... 2> log``: no carriage return in it."""
    assert main(["train", "--config", str(DEBUG), f"output_dir={tmp_path / 'run'}", "max_steps=3", "batch_size=2",
                 "grad_accum=1", "train_size=8", "eval_size=2", "eval_every=0", "max_length=16"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # neither our bar nor transformers' (writing the base's weights)
    steps = [line.split(" (")[0] for line in err.splitlines() if line.startswith("train step ")]
    assert steps == ["train step 1/3", "train step 2/3", "train step 3/3"]
