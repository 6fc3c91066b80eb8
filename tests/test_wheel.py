"""A wheel built from the checkout works outside it: installed into a clean target, it trains from an empty
directory with the DeepSpeed preset named ``zero2``, and ``hf_deepspeed_config("zero2")`` finds the preset.

The wheel's Python sees the project's dependencies (torch, deepspeed, transformers) but not the checkout: its
site-packages is a fresh virtual environment's, with the dependencies' folder added by a ``.pth`` line, so the
editable install of the checkout (a finder that ``.pth`` files in the dependencies' folder would load) is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY = """\
max_steps: 2
batch_size: 8
eval_every: 0
log_every: 1
model: {source: tiny_llama, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}
data: {source: synthetic, max_length: 32, train_size: 64, eval_size: 16}
spra: {lora_rank: 4, seed: 7}
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The Python of a fresh environment that holds the wheel of the checkout and nothing else of it."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # build from a copy: the build's own folders never land in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "spra_dist", source / "spra_dist", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = root / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("spra_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("zero1", "zero2", "zero3", "zero3_offload"):
        assert f"spra_dist/distributed/presets/{preset}.json" in names
    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    return python


def run(python: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_trains_with_the_zero2_preset_from_an_empty_directory(installed, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = run(installed, tmp_path, "-m", "spra_dist", "train", "--config", "tiny.yaml", "engine=deepspeed",
               "deepspeed_config=zero2", "output_dir=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter.safetensors").is_file()
    summary = (tmp_path / "out" / "summary.json").read_text()
    assert '"engine": "deepspeed"' in summary and '"steps": 2' in summary


def test_the_wheel_runs_and_gives_the_hf_trainer_its_preset(installed, tmp_path):
    """The package imported is the wheel's (not the checkout's), and it finds its preset for the HF Trainer."""
    code = ("import spra_dist; from spra_dist.integrations.hf import hf_deepspeed_config; "
            "c = hf_deepspeed_config('zero2'); print(spra_dist.__file__, c['zero_optimization']['stage'], "
            "c['train_batch_size'])")
    proc = run(installed, tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, stage, batch = proc.stdout.split()
    assert where.startswith(str(installed.parents[1])) and not where.startswith(str(ROOT))
    assert (stage, batch) == ("2", "auto")
