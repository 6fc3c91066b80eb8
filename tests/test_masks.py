"""Masks are a pure, versioned function: golden vectors, exact k, uniformity, O(k) cost."""

import itertools
import os
import subprocess
import sys
import time

import pytest
import torch

from spra_dist.core.masks import MASK_VERSION, budget, sample_indices

# Saved adapters depend on these forever: a change here is a new MASK_VERSION, never an edit.
GOLDEN_V1 = [
    ((1234, "model.layers.0.self_attn.q_proj.weight", 576 * 576, 8),
     [13612, 119309, 159262, 159638, 184111, 197037, 228104, 320865]),
    ((0, "w", 100, 10), [17, 27, 31, 40, 44, 55, 67, 69, 82, 83]),
    ((7, "encoder.layer.3.output.dense.weight", 384 * 1536, 5), [79216, 82342, 281728, 415671, 583673]),
    ((7, "big", 10**10, 4), [4022528706, 4152946087, 7041837501, 7338666174]),
    ((5, "half", 16, 12), [1, 2, 4, 5, 6, 7, 9, 11, 12, 13, 14, 15]),  # complement path
]


def test_mask_version_is_pinned():
    assert MASK_VERSION == 1


@pytest.mark.parametrize("args,expected", GOLDEN_V1)
def test_golden_vectors(args, expected):
    assert sample_indices(*args).tolist() == expected


@pytest.mark.parametrize("numel,k", [(1, 1), (10, 10), (50, 1), (50, 25), (50, 26), (1000, 999), (4096, 300)])
def test_exact_k_sorted_unique_in_range(numel, k):
    idx = sample_indices(3, "layer.weight", numel, k)
    assert idx.dtype == torch.int64 and idx.numel() == k
    assert torch.equal(idx, torch.unique(idx))  # unique() sorts: equal means sorted and distinct
    assert idx.min() >= 0 and idx.max() < numel


def test_depends_on_seed_and_key():
    a = sample_indices(1, "a.weight", 10_000, 100)
    assert not torch.equal(a, sample_indices(2, "a.weight", 10_000, 100))
    assert not torch.equal(a, sample_indices(1, "b.weight", 10_000, 100))


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        sample_indices(1, "a", 10, 11)
    with pytest.raises(ValueError, match="k must be"):
        sample_indices(1, "a", 10, 0)


@pytest.mark.slow
def test_same_indices_in_another_process_with_other_thread_count():
    code = ("import torch; torch.set_num_threads(1); from spra_dist.core.masks import sample_indices;"
            "print(sample_indices(99, 'model.layers.1.mlp.up_proj.weight', 1536 * 576, 20000).sum().item())")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    here = sample_indices(99, "model.layers.1.mlp.up_proj.weight", 1536 * 576, 20000).sum().item()
    assert int(out.stdout.strip()) == here


def test_uniform_over_k_subsets_chi_square():
    numel, k, draws = 6, 3, 6000
    subsets = {s: 0 for s in itertools.combinations(range(numel), k)}
    for seed in range(draws):
        subsets[tuple(sample_indices(seed, "chi", numel, k).tolist())] += 1
    expected = draws / len(subsets)
    chi2 = sum((c - expected) ** 2 / expected for c in subsets.values())
    assert chi2 < 43.82, f"chi-square {chi2:.1f} over 19 degrees of freedom (p=0.001 bound 43.82)"


def test_positions_uniform_in_large_matrix():
    # Each position is chosen with probability k/numel: the counts per tenth of the range are close.
    idx = sample_indices(11, "spread", 1_000_000, 100_000)
    counts = torch.bincount(idx // 100_000, minlength=10).float()
    assert (counts - 10_000).abs().max() < 500  # ~5 sigma of a binomial(100k, 0.1)


def test_huge_matrix_is_o_k():
    start = time.perf_counter()
    idx = sample_indices(1, "huge", 10**10, 10**5)
    assert time.perf_counter() - start < 2.0  # a numel-sized tensor would be 80 GB
    assert idx.numel() == 10**5 and idx.max() < 10**10


def test_budget():
    assert budget((576, 576), lora_rank=8, density=None) == 8 * 1152
    assert budget((4, 4), lora_rank=8, density=None) == 16  # capped at numel
    assert budget((100, 100), lora_rank=None, density=0.01) == 100
    assert budget((10, 10), lora_rank=None, density=0.001) == 1  # at least one entry
