"""A CPU SDDMM that reads token-major activations: the values' gradient without transposed copies.

``out[j] = Σ_t a[t, r_j] · b[t, c_j]`` for ``a`` (T, m), ``b`` (T, n), both token-major as autograd hands them
over, and the mask in CSR form (row pointers ``crow``, column indices ``cols``). ``torch.sparse.sampled_addmm``
computes each entry as a dot product over tokens, so it needs both operands feature-major: two transposed
copies of the activations through memory, which cost 2–4× its kernel (docs/benchmarks.md). Here each thread
takes tiles of ``TILE`` tokens, transposes them into a small buffer that stays in cache (converting bf16 / fp16
to fp32 on the way), and adds each entry's dot product over the tile to a per-thread accumulator; the
accumulators are summed at the end. Sums run in fp32 (fp64 for fp64 inputs).

The kernel is C++ with OpenMP, compiled on first use with ``torch.utils.cpp_extension`` into torch's extension
cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); ``make setup`` compiles it once. Without a
working compiler, ``cpu_sampled_matmul_t`` returns ``None`` after one warning and callers use
``sampled_addmm``. It runs when ``SPRA_CPU_KERNEL=1``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings

import torch

TILE = 32  # tokens per tile: (m + n) · TILE · 4 bytes of buffer stay in L2 for m + n up to ~4,000

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>
#include <vector>

template <typename scalar_t, typename acc_t>
static void transpose_tile(const scalar_t* src, int64_t ld, int64_t tb, int64_t features, int64_t tile,
                           acc_t* dst) {
  for (int64_t f = 0; f < features; ++f) {
    acc_t* row = dst + f * tile;
    for (int64_t t = 0; t < tb; ++t) row[t] = static_cast<acc_t>(src[t * ld + f]);
    for (int64_t t = tb; t < tile; ++t) row[t] = acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
static void sddmm_tiles(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, int64_t T, int64_t m,
                        int64_t n, const int64_t* crow, const int32_t* cols, int64_t k, int64_t tile,
                        acc_t* out) {
  const int64_t n_tiles = (T + tile - 1) / tile;
  const int64_t n_chunks = std::min<int64_t>(at::get_num_threads(), n_tiles);
  std::vector<acc_t> partial(static_cast<size_t>(n_chunks) * k, acc_t(0));
  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> at_buf(static_cast<size_t>(m) * tile), bt_buf(static_cast<size_t>(n) * tile);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* acc = partial.data() + static_cast<size_t>(chunk) * k;
      for (int64_t ti = chunk * n_tiles / n_chunks; ti < (chunk + 1) * n_tiles / n_chunks; ++ti) {
        const int64_t t0 = ti * tile, tb = std::min(tile, T - t0);  // a full-length dot: padding is zero
        // The tile, transposed into feature-major rows of length tile (zero-padded past T): writes run in
        // order, and the strided reads touch the same tb cache lines for consecutive features.
        transpose_tile(a + t0 * lda, lda, tb, m, tile, at_buf.data());
        transpose_tile(b + t0 * ldb, ldb, tb, n, tile, bt_buf.data());
        for (int64_t r = 0; r < m; ++r) {
          const acc_t* av = at_buf.data() + r * tile;
          for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
            const acc_t* bv = bt_buf.data() + cols[j] * tile;
            acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < tile; ++t) sum += av[t] * bv[t];
            acc[j] += sum;
          }
        }
      }
    }
  });
  for (int64_t j = 0; j < k; ++j) {
    acc_t s = 0;
    for (int64_t c = 0; c < n_chunks; ++c) s += partial[static_cast<size_t>(c) * k + j];
    out[j] = s;
  }
}

torch::Tensor sddmm_token_major(torch::Tensor a, torch::Tensor b, torch::Tensor crow, torch::Tensor cols,
                                int64_t tile) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "a (T, m) and b (T, n) expected");
  TORCH_CHECK(a.stride(1) == 1 && b.stride(1) == 1, "token-major operands expected (unit feature stride)");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must share a dtype");
  TORCH_CHECK(crow.scalar_type() == at::kLong && cols.scalar_type() == at::kInt, "int64 crow, int32 cols expected");
  TORCH_CHECK(crow.numel() == a.size(1) + 1, "crow must have m + 1 entries");
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = torch::empty({cols.numel()}, a.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "sddmm_token_major", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    sddmm_tiles<scalar_t, acc_t>(a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(), b.stride(0),
                                 a.size(0), a.size(1), b.size(1), crow.data_ptr<int64_t>(),
                                 cols.data_ptr<int32_t>(), cols.numel(), tile, out.data_ptr<acc_t>());
  });
  return out;
}
"""

_lock = threading.Lock()
_module = None
_failed = False


def _load():
    """The compiled extension, built on first call (cached by torch across processes); None when it can't be."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline

                flags = ["-O3", "-fopenmp", *os.environ.get("SPRA_CPU_KERNEL_FLAGS", "").split()]
                tag = hashlib.sha1((_SOURCE + " ".join(flags)).encode()).hexdigest()[:10]
                _module = load_inline(name=f"spra_dist_cpu_sddmm_{tag}", cpp_sources=[_SOURCE],
                                      functions=["sddmm_token_major"], extra_cflags=flags,
                                      extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as err:  # no compiler, no headers, a failed build: today's path still works
                _failed = True
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(f"spra_dist: the CPU SDDMM kernel could not be compiled ({first}); using "
                              f"torch.sparse.sampled_addmm instead (slower: it copies the activations)",
                              RuntimeWarning, stacklevel=3)
    return _module


def enabled() -> bool:
    return os.environ.get("SPRA_CPU_KERNEL", "0") == "1"


def cpu_sampled_matmul_t(a: torch.Tensor, b: torch.Tensor, crow: torch.Tensor,
                         cols: torch.Tensor) -> torch.Tensor | None:
    """``(aᵀ @ b)`` at the CSR positions (``crow`` over a's m columns, ``cols`` into b's n columns), summed in at
    least fp32; ``None`` when the kernel is switched off or could not be built."""
    if not enabled() or a.device.type != "cpu":
        return None
    module = _load()
    if module is None:
        return None
    # Row pointers as int64 (n_rows + 1 of them), columns as int32 (each < n, so always fits).
    return module.sddmm_token_major(a.contiguous(), b.contiguous(), crow.long(), cols.int(), TILE)


def build() -> bool:
    """Compile the kernel now (``make setup`` calls this); True when it is usable."""
    return _load() is not None


if __name__ == "__main__":
    print("CPU SDDMM kernel:", "ready" if build() else "unavailable (see the warning above)")
