"""The Triton SDDMM: the cases of tests/triton_cases.py on CPU through Triton's interpreter (and compiled on CUDA
when there is a GPU), plus the choice of backend.

The cases run in a child pytest: ``TRITON_INTERPRET`` must be set before triton is first imported, which this
process may already have done (torch.compile's tests, for one).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[gpu]): the Triton SDDMM is never "
                                     "used, sampled_addmm answers (tests/test_layer.py)")

from spra_dist.core.kernels.sddmm import sampled_weight_grad  # noqa: E402
from spra_dist.core.kernels.triton_sddmm import triton_available, use_triton  # noqa: E402

CASES = Path(__file__).with_name("triton_cases.py")


def run_cases(**env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPRA_SDDMM")}
    full.update(env, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", str(CASES)],
                          cwd=CASES.parent.parent, env=full, capture_output=True, text=True, timeout=600)


def assert_all_passed(proc: subprocess.CompletedProcess) -> None:
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail


@pytest.mark.slow
def test_cases_under_the_interpreter():
    proc = run_cases(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    assert_all_passed(proc)
    assert proc.stdout.count("max error / max |reference|") == 6  # 3 dtypes x Linear / Conv1D


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the compiled kernel runs in make gpu-check")
def test_cases_compiled_on_cuda():
    assert_all_passed(run_cases())


def test_backend_selection(monkeypatch):
    x, dy = torch.randn(4, 6), torch.randn(4, 5)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SPRA_SDDMM", raising=False)
    assert not use_triton(x, dy)  # auto on CPU: sampled_addmm
    assert not triton_available("cpu")
    monkeypatch.setenv("SPRA_SDDMM", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_triton(x, dy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at each call: selection only, no kernel is built here
    assert use_triton(x, dy) and triton_available("cpu")
    with pytest.raises(ValueError, match="float64"):
        use_triton(x.double(), dy.double())
    monkeypatch.setenv("SPRA_SDDMM", "cusparse")
    with pytest.raises(ValueError, match="not one of auto, triton, sampled_addmm"):
        sampled_weight_grad(x, dy, torch.tensor([0, 3]), transposed=False)
    monkeypatch.setenv("SPRA_SDDMM", "sampled_addmm")
    assert not use_triton(x, dy)
