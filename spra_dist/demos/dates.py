"""A small instruction task for the SFT demo: write a date given in words as ISO 8601 (YYYY-MM-DD).

    python -m spra_dist.demos.dates data/iso_dates        # train.jsonl (2,000) + eval.jsonl (200)

Rows are OpenAI chat ``messages``; a fixed seed makes the same files on every machine. SmolLM2-135M-Instruct
answers in prose or with the wrong field order (exact match near 0); a few hundred SpaRA steps teach it the
format and the month numbers.
"""

from __future__ import annotations

import argparse
import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ASKS = ["Write this date in ISO 8601 format (YYYY-MM-DD): {d}", "Convert to YYYY-MM-DD: {d}",
        "What is {d} as an ISO date?"]


def spoken(day: date, style: int) -> str:
    month = MONTHS[day.month - 1]
    match style:
        case 0:
            return f"{month} {day.day}, {day.year}"
        case 1:
            return f"{day.day} {month} {day.year}"
        case _:
            return f"{month[:3]} {day.day} {day.year}"


def rows(count: int, *, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    start = date(1950, 1, 1)
    out = []
    for _ in range(count):
        day = start + timedelta(days=int(rng.integers(0, 100 * 365)))
        ask = ASKS[int(rng.integers(len(ASKS)))].format(d=spoken(day, int(rng.integers(3))))
        out.append({"messages": [{"role": "user", "content": ask},
                                 {"role": "assistant", "content": day.isoformat()}]})
    return out


def write(folder: str | Path, *, train: int = 2000, evals: int = 200) -> Path:
    """Write ``train.jsonl`` and ``eval.jsonl`` (disjoint seeds) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train.jsonl", train, 0), ("eval.jsonl", evals, 1)):
        text = "".join(json.dumps(r) + "\n" for r in rows(count, seed=seed))
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="data/iso_dates")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args()
    print(f"wrote {write(args.folder, train=args.train, evals=args.eval)}")


if __name__ == "__main__":
    main()
