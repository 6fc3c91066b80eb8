"""The bundled Rotten Tomatoes reviews written as a user's CSV files, for the generic classification path.

    python -m spra_dist.demos.reviews data/reviews     # train.csv + eval.csv: columns review, sentiment

The rows, their order and the held-out split are those of ``data.source=rotten_tomatoes`` (the demo), with
string labels (fresh / rotten), so configs/train/minilm_csv.yaml reproduces the demo's accuracy from a CSV.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from spra_dist.data.config import DataConfig
from spra_dist.demos.sources import rotten_tomatoes_rows


def write(folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, cols in zip(("train.csv", "eval.csv"), rotten_tomatoes_rows(DataConfig()), strict=True):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(["review", "sentiment"])
            names = ["fresh" if y == 1 else "rotten" for y in cols["label"]]
            out.writerows(zip(cols["text"], names, strict=True))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="data/reviews")
    print(f"wrote {write(parser.parse_args().folder)}")


if __name__ == "__main__":
    main()
