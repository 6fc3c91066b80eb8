"""README sections run as written: their shell and Python blocks, in a fresh folder beside the repo's configs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def section_blocks(title: str) -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block under the README heading ``## title``."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)


@pytest.mark.slow
def test_managing_adapters_runs_as_written(tmp_path):
    blocks = section_blocks("Managing adapters")
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                                     os.environ["PATH"]]))
    for line in blocks[0][1].strip().splitlines():
        proc = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        if line.startswith("spra generate"):
            assert "--- base" in proc.stdout and "--- adapter" in proc.stdout, proc.stdout
    assert list((tmp_path / "runs/tiny_a/tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "merged/tiny_ab/model.safetensors").is_file()
    script = tmp_path / "snippet.py"
    script.write_text(blocks[1][1])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['b', 'mix'] mix"
    assert (tmp_path / "runs/tiny_mix/adapter_config.json").is_file()
