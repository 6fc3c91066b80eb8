"""Where an adapted layer's step time goes, part by part, against the same layer frozen.

    HF_HUB_OFFLINE=1 python -m bench.profile_step                  # fp32 and bf16, bench shapes, T = 1024
    HF_HUB_OFFLINE=1 python -m bench.profile_step --dtype bfloat16 --tokens 2048

For each shape (out × in, MiniLM and SmolLM2 linears, k at the LoRA r=8 budget) and activation dtype, median
milliseconds of:
- frozen: what the same layer costs when frozen: forward ``x Wᵀ`` and the input gradient ``dY W``;
- merge/restore: the forward's write of the k merged entries into W and of the k originals back (twice a step:
  forward and input-gradient);
- CSR build: row pointers and column indices from the flat mask (what the layer now caches: paid once per mask);
- copies: the two feature-major fp32 operands ``sampled_addmm`` needs (for q/k/v and gate/up one input copy is
  shared, so a shape's share of it is 1/3 or 1/2 in a model);
- dtype casts: bf16 → fp32 of the two operands, when the activations are bf16 (inside the copies above);
- kernel: ``sampled_addmm`` on operands already feature-major;
- as called: the values' gradient as the layer runs it (copies + kernel; CSR cached);
- token-major C++ kernel: ``spra_dist.core.kernels.cpu_sddmm`` (no copies), when it builds.
The last columns give the adapted layer's total (frozen + merge/restore + as called) over frozen.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.nn.functional as F

from bench.sddmm_parts import median_ms
from spra_dist.core.kernels import csr_structure, index_dtype
from spra_dist.core.kernels.cpu_sddmm import _load as load_cpu_kernel
from spra_dist.core.kernels.entries import MergedWeight
from spra_dist.core.kernels.sddmm import sampled_matmul_t
from spra_dist.core.masks import budget, sample_indices

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
SHAPES = {  # (out, in): model linears
    "minilm q/k/v/o 384×384": (384, 384),
    "minilm up 1536×384": (1536, 384),
    "minilm down 384×1536": (384, 1536),
    "smollm2 q/o 576×576": (576, 576),
    "smollm2 k/v 192×576": (192, 576),
    "smollm2 gate/up 1536×576": (1536, 576),
    "smollm2 down 576×1536": (576, 1536),
}
COLUMNS = ["frozen", "merge/restore", "CSR build", "copies", "dtype casts", "kernel", "as called", "C++ token-major"]


def profile_shape(out: int, inp: int, *, tokens: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    k = budget((out, inp), lora_rank=8, density=None)
    idx = sample_indices(0, "w", out * inp, k).to(index_dtype(out * inp))  # as a layer holds it
    w = torch.randn(out, inp, dtype=dtype) * 0.02
    values = torch.zeros(k)
    x, dy = torch.randn(tokens, inp, dtype=dtype), torch.randn(tokens, out, dtype=dtype)
    crow, cols = csr_structure(idx, out, inp)
    mask = torch.sparse_csr_tensor(crow, cols, torch.zeros(k), (out, inp), check_invariants=False)
    dyt, xt = dy.t().float().contiguous(), x.t().float().contiguous()

    def merged_restore():
        with MergedWeight(w, idx, values):
            pass

    row = {
        "frozen": median_ms(lambda: (F.linear(x, w), dy @ w), repeats),
        "merge/restore": 2 * median_ms(merged_restore, repeats),
        "CSR build": median_ms(lambda: csr_structure(idx, out, inp), repeats),
        "copies": median_ms(lambda: (dy.t().float().contiguous(), x.t().float().contiguous()), repeats),
        "dtype casts": (median_ms(lambda: (dy.float(), x.float()), repeats) if dtype != torch.float32 else 0.0),
        "kernel": median_ms(lambda: torch.sparse.sampled_addmm(mask, dyt, xt.t(), beta=0.0), repeats),
        "as called": median_ms(lambda: sampled_matmul_t(dy, x, idx, inp, crow=crow), repeats),
    }
    module = load_cpu_kernel()
    row["C++ token-major"] = (median_ms(lambda: module.sddmm_token_major(dy, x, crow.long(), cols, 32), repeats)
                              if module is not None else float("nan"))
    return row


def table(*, tokens: int, dtypes: list[str], repeats: int) -> str:
    lines = [f"_T = {tokens} tokens, {torch.get_num_threads()} threads, median ms of {repeats}; load average "
             f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}_", ""]
    for name in dtypes:
        dtype = getattr(torch, name)
        lines += [f"**{name}**", "", "| shape, k | " + " | ".join(COLUMNS) + " | adapted ÷ frozen (as called) | "
                  "adapted ÷ frozen (C++) |", "|---|" + "---:|" * (len(COLUMNS) + 2)]
        for label, (out, inp) in SHAPES.items():
            row = profile_shape(out, inp, tokens=tokens, dtype=dtype, repeats=repeats)
            k = budget((out, inp), lora_rank=8, density=None)
            base = row["frozen"] + row["merge/restore"]
            lines.append(f"| {label}, {k:,} | " + " | ".join(f"{row[c]:.2f}" for c in COLUMNS) +
                         f" | {(base + row['as called']) / row['frozen']:.2f} | "
                         f"{(base + row['C++ token-major']) / row['frozen']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    print(table(tokens=args.tokens, dtypes=args.dtype, repeats=args.repeats))


if __name__ == "__main__":
    main()
