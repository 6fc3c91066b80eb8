"""bench.scale's simulation against closed form: on a tiny Llama whose shapes FSDP2 cuts unevenly over 8 ranks, every
per-rank figure equals numel × dtype size of rank 0's or the last rank's shard, computed here from the shapes.

FSDP2 shards dim 0 as ``torch.chunk`` does: ``c = ceil(n / W)`` rows a rank, the last ranks get fewer (or none), and
every rank's parameter storage is padded to ``c`` rows. Gradients land in the reduce-scatter's padded output; Adam's
moments are ``zeros_like`` of the unpadded shard. Over an NF4 base each adapted matrix's packed parts split by rows.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from bench import scale_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD, R, SEQ = 8, 3, 16
# hidden 36 over 8 ranks: 5 rows, the last rank 1; key/value width 18: 3 rows, the last two ranks none;
# vocabulary 100: 13 rows, the last rank 9. LoRA's A (3 rows) sits on ranks 0-2 only.
SHAPE = {"hidden_size": 36, "intermediate_size": 44, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "vocab_size": 100, "max_position_embeddings": 64, "tie_word_embeddings": False,
         "use_cache": False, "attn_implementation": "sdpa"}
# NF4 packs rows of whole 64-value blocks, and FSDP2 must split an NF4 matrix's rows evenly: hidden 128 and
# intermediate 192 (3 blocks a row, so 3 blocks a scale factor; 2 at hidden 128), key/value width 64, every adapted
# matrix 8, 16 or 24 rows a rank. The vocabulary stays 100, so the bf16 rest is still cut unevenly.
NF4_SHAPE = dict(SHAPE, hidden_size=128, intermediate_size=192)


def rows_of(n: int, rank: int) -> tuple[int, int]:
    """(rows this rank holds, rows its storage is padded to) of a dim 0 of ``n`` over WORLD ranks."""
    c = -(-n // WORLD)
    return max(0, min(c, n - rank * c)), c


def shard(shapes: list[tuple[int, ...]], rank: int, itemsize: int) -> tuple[int, int]:
    """(padded, logical) bytes of ``rank``'s shards of tensors of ``shapes``."""
    padded = logical = 0
    for shape in shapes:
        row = 1
        for d in shape[1:]:
            row *= d
        held, c = rows_of(shape[0], rank)
        padded, logical = padded + c * row * itemsize, logical + held * row * itemsize
    return padded, logical


def linears(shape: dict = SHAPE, *, layers: int | None = None) -> list[tuple[int, int]]:
    """(n_out, n_in) of each adapted linear (of the first ``layers`` decoder layers; all by default)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * (layers or shape["num_hidden_layers"])


def base_shapes(shape: dict = SHAPE) -> list[tuple[int, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    return [tuple(p.shape) for p in model.parameters()]


def nf4_sharded(n_out: int, n_in: int) -> int:
    """Bytes of a bf16 (n_out, n_in) matrix packed in NF4 that FSDP2 splits by rows: 4 bits a value, an int8 scale per
    64-value block, and a bf16 factor per group of scales, a group being the most blocks up to 256 that divide a row's
    (so that no group spans two rows)."""
    blocks = n_in // 64
    group = max(d for d in range(1, min(blocks, 256) + 1) if blocks % d == 0)
    return n_out * n_in // 2 + n_out * blocks + 2 * (n_out * blocks // group)


NF4_REPLICATED = 2 + 16 * 2
"""Bytes of an NF4 matrix every rank holds whole: the scales' bf16 mean and the 16-entry bf16 code book."""


def simulate(method: str, shape: dict = SHAPE, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.scale_sim", "--shape", json.dumps(shape), "--method", method,
           "--lora-rank", str(R), "--worlds", str(WORLD), "--seq", str(SEQ), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, int], dict]:
    procs = {m: simulate(m) for m in ("spra", "lora")}
    out = {}
    for method, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out.update({(method, r["rank"]): r for r in json.loads(stdout.strip().splitlines()[-1])})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spra", "lora"])
@pytest.mark.parametrize("rank", [0, WORLD - 1])
def test_each_figure_is_its_closed_form(rows, method, rank):
    row = rows[(method, rank)]
    if method == "spra":
        trained = [(R * (n_out + n_in),) for n_out, n_in in linears()]
    else:
        trained = [s for n_out, n_in in linears() for s in ((R, n_in), (n_out, R))]
    base, base_logical = shard(base_shapes(), rank, 2)  # bf16
    values, values_logical = shard(trained, rank, 4)  # fp32 values, fp32 gradients and moments
    assert (row["base_shard"], row["base_shard_logical"]) == (base, base_logical)
    assert (row["values"], row["values_logical"]) == (values, values_logical)
    assert (row["grads"], row["grads_logical"]) == (values, values_logical)
    assert (row["adam"], row["adam_logical"]) == (2 * values_logical, 2 * values_logical)
    # the tracker books the same bytes: sharded parameters at the start, gradients after backward, and Adam's
    # moments plus one 4-byte step count per parameter
    assert row["tracker_sharded_param"] == base + values and row["tracker_sharded_grad"] == values
    for peak in (row["no_ckpt"], row["ckpt"]):
        assert peak["OptState"] == 2 * values_logical + 4 * len(trained)
    if rank == WORLD - 1:  # the shapes were chosen so that the last rank's shards are short
        assert base_logical < base and values_logical < values
    assert row["ckpt"]["Activation"] < row["no_ckpt"]["Activation"]


@pytest.mark.slow
def test_mask_state_from_k(rows):
    """Host residency (the default): each matrix keeps int32 indices (k) and row pointers (n_out + 1) in host memory;
    the device sees one matrix's mask per use, two at once at most. The same on every rank."""
    sizes = [4 * R * (n_out + n_in) + 4 * (n_out + 1) for n_out, n_in in linears()]
    for rank in (0, WORLD - 1):
        row = rows[("spra", rank)]
        assert (row["mask_device"], row["mask_host"], row["mask_transient_peak"]) == (0, sum(sizes), 2 * max(sizes))
        assert row["trainable"] == R * sum(n_out + n_in for n_out, n_in in linears())
        assert rows[("lora", rank)]["trainable"] == row["trainable"]
        assert rows[("lora", rank)]["mask_host"] == 0


def test_zero3_counts_frozen_and_trained_apart():
    row = {"model": "70b", "lora_rank": 8, "world": 64, "rank": 0, "frozen": 64_000, "trainable": 640}
    spra, lora = dict(row, method="spra", mask_device=1000), dict(row, method="lora", mask_device=0)
    (e,) = scale_report.zero3([spra, lora])
    assert e["lora"] == 2 * 1000 + 18 * 10 and e["spra"] == e["lora"] + 1000
    assert e["all_trained"] == 18 * (64_000 + 640) / 64


@pytest.mark.slow
def test_nf4_base_shard_is_its_closed_form():
    """Over an NF4 base each rank holds 1/W of every adapted matrix's packed bytes plus its two replicated constants,
    and the bf16 rest as before; a decoder layer's all-gather moves the packed bytes, not bf16 ones."""
    proc = simulate("spra", NF4_SHAPE, "--quantize-base", "nf4", "--checkpointing", "off")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    adapted = linears(NF4_SHAPE)
    rest = list(base_shapes(NF4_SHAPE))
    for n_out, n_in in adapted:
        rest.remove((n_out, n_in))
    packed = sum(nf4_sharded(*m) // WORLD + NF4_REPLICATED for m in adapted)
    h = NF4_SHAPE["hidden_size"]
    values = [R * (n_out + n_in) for n_out, n_in in linears(NF4_SHAPE, layers=1)]
    # one layer's all-gather: its packed matrices, two norms and its values in bf16 (FSDP2's param dtype), each
    # parameter at its padded shard size times W
    layer = (sum(nf4_sharded(*m) for m in linears(NF4_SHAPE, layers=1)) + shard([(h,), (h,)], 0, 2)[0] * WORLD
             + shard([(k,) for k in values], 0, 2)[0] * WORLD)
    vocab = NF4_SHAPE["vocab_size"]
    root = shard([(vocab, h), (vocab, h), (h,)], 0, 2)[0] * WORLD  # embeddings, output head, final norm
    rows = {r["rank"]: r for r in json.loads(stdout.strip().splitlines()[-1])}
    for rank in (0, WORLD - 1):
        row = rows[rank]
        dense, dense_logical = shard(rest, rank, 2)
        assert row["quantize_base"] == "nf4"
        assert (row["base_shard"], row["base_shard_logical"]) == (packed + dense, packed + dense_logical)
        assert row["tracker_sharded_param"] == packed + dense + row["values"]
        assert row["all_gather_max"] == max(layer, root)
