"""Where the sampled backward's time goes: the CPU kernel against the transposed copies it needs.

    .venv/bin/python -m bench.sddmm_parts

For each shape: ``sampled_addmm`` called on token-major operands (as the layer does), the same kernel on
operands already feature-major, one transposed copy of the input, and the dense ``dYᵀX`` then gather.
"""

from __future__ import annotations

import time
import warnings

import torch

from spra_dist.core.masks import sample_indices

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
SHAPES = [(384, 384), (1536, 384), (384, 1536), (1536, 576), (576, 1536)]  # (out, in): MiniLM, SmolLM2 MLPs


def median_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def measure(out: int, inp: int, tokens: int) -> list[float]:
    k = 8 * (out + inp)
    idx = sample_indices(1, "w", out * inp, k)
    dy, x = torch.randn(tokens, out), torch.randn(tokens, inp)
    crow = torch.searchsorted(idx, torch.arange(out + 1) * inp)
    mask = torch.sparse_csr_tensor(crow, idx % inp, torch.zeros(k), (out, inp), check_invariants=False)
    dyt, xt = dy.t().contiguous(), x.t().contiguous()
    return [
        median_ms(lambda: torch.sparse.sampled_addmm(mask, dy.t(), x, beta=0.0)),
        median_ms(lambda: torch.sparse.sampled_addmm(mask, dyt, xt.t(), beta=0.0)),
        median_ms(lambda: x.t().contiguous()),
        median_ms(lambda: (dy.t() @ x).view(-1)[idx]),
    ]


def main(tokens: int = 1024) -> None:
    torch.manual_seed(0)
    print(f"| shape (out × in), k | sampled_addmm, token-major | same, feature-major | transposed copy of x | "
          f"dense dYᵀX + gather |  (ms, T = {tokens}, {torch.get_num_threads()} threads)")
    print("|---|---:|---:|---:|---:|")
    for out, inp in SHAPES:
        row = measure(out, inp, tokens)
        print(f"| {out} × {inp}, {8 * (out + inp):,} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()
