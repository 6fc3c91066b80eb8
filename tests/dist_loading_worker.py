"""Worker: saved bases loaded after sharding (built on meta, each rank reading its part) against today's path
(``from_pretrained`` on every rank, then sharding), under FSDP2 and ZeRO-3. Rank 0 writes every rank's results:
per case, the tensors and the adapter after two training steps that differ between the two paths, and the peak
memory growth of each.

    torchrun --nproc_per_node 2 tests/dist_loading_worker.py ROOT OUT.json [CASE ...]

Before each measurement the memory an earlier case freed goes back to the system (``malloc_trim``), so that the
next case's allocations show in its own growth instead of reusing it.
"""

import ctypes
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as tf
from tiny_models import tiny_tokenizer

from spra_dist import SpraConfig, apply_spra
from spra_dist.core.model import trainable_parameters
from spra_dist.distributed.deepspeed import load_deepspeed_config
from spra_dist.distributed.group import exit_rank, init_distributed, shutdown, world
from spra_dist.distributed.loading import plan_load
from spra_dist.train.models import build_model
from spra_dist.train.recipe import wrap_model
from spra_dist.train.schema import ModelConfig, TrainConfig

# A Llama of 94M parameters whose largest tensor has 8.2M, saved in bf16 (187 MB, in two files and an index) and
# trained in fp32: 374 MB, which from_pretrained converts on every rank.
BIG = dict(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=128, tie_word_embeddings=False)
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def save_bases(root: Path) -> None:
    """Rank 0 writes the bases: the big Llama (sharded files), a tiny Llama with tied embeddings (one file), and a
    tiny BERT encoder without a head (loaded under a classification head, which the checkpoint lacks)."""
    torch.manual_seed(0)
    big = tf.LlamaForCausalLM(tf.LlamaConfig(**BIG, **IDS)).to(torch.bfloat16)
    big.save_pretrained(root / "big", max_shard_size="100MB")
    del big
    tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, **IDS, tie_word_embeddings=True)).save_pretrained(root / "tied")
    tf.BertModel(tf.BertConfig(**SMALL, pad_token_id=0)).save_pretrained(root / "bert")
    for name in ("big", "tied", "bert"):
        tiny_tokenizer().save_pretrained(root / name)
    config = load_deepspeed_config("zero3")
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    (root / "zero3.json").write_text(json.dumps(config))


def memory_mb(field: str) -> float:
    line = next(li for li in Path("/proc/self/status").read_text().splitlines() if li.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def engine_for(root: Path, base: str, engine: str, *, meta: bool, task: str = "causal_lm", head: tuple = (),
               mixed_precision: str = "no"):
    """The recipe's steps for ``engine``: build (on meta or loaded), apply SpaRA, plan, shard and load."""
    zero3 = engine == "zero3"
    cfg = TrainConfig(model=ModelConfig(source="hf", name_or_path=str(root / base), task=task),
                      engine="deepspeed" if zero3 else engine, deepspeed_config=str(root / "zero3.json") if zero3
                      else None, batch_size=2 * world()[1], lr=1e-2, max_grad_norm=None, warmup_steps=0,
                      spra=SpraConfig(seed=7, trainable_modules=list(head)))
    built = build_model(cfg.model, seed=cfg.seed, meta=meta)
    assert (built.base is not None) == meta
    model = apply_spra(built.model, cfg.spra)
    plan = plan_load(model, built.base, initial=built.initial, device=torch.device("cpu")) if meta else None
    return wrap_model(model, cfg, engine_name=cfg.engine, mixed_precision=mixed_precision, plan=plan)


def measured(build) -> tuple[object, float]:
    """``build()`` and the growth of this process's peak resident memory over it, in MB."""
    gc.collect()  # an earlier case's models (FSDP2's hooks make cycles) go now, not in the middle of this one
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = memory_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    out = build()
    return out, memory_mb("VmHWM") - before


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``p``: FSDP2's rows or ZeRO-3's partition."""
    return p.to_local() if hasattr(p, "to_local") else p.ds_tensor if hasattr(p, "ds_tensor") else p


def tensors_equal(a, b) -> list[str]:
    """Names of parameters and buffers whose parts on this rank differ between engines ``a`` and ``b``."""
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    bad = [n for n in pa if not torch.equal(local(pa[n]), local(pb[n]))]
    ba, bb = dict(a.model.named_buffers()), dict(b.model.named_buffers())
    return bad + [n for n in ba if not torch.equal(ba[n], bb[n])]


def train_two_steps(engine, vocab: int, task: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + world()[0])  # the same batches for both engines, one per rank
    for _ in range(2):
        ids = torch.randint(3, vocab, (2, 16), generator=g)
        labels = torch.randint(0, 2, (2,), generator=g) if task == "classification" else ids
        engine.forward_backward({"input_ids": ids, "labels": labels}, n_micro=1, last=True)
        engine.step(None)
    return {n: engine.full_value(p) for n, p in trainable_parameters(engine.model)}


def bound_mb(engine) -> float:
    """This rank's parts of every parameter, plus twice the largest whole tensor (the one being loaded and the
    reader's mapped pages of it), plus 32 MB for everything else."""
    params = list(engine.model.parameters())
    largest = max(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
    return (sum(local(p).numel() * p.element_size() for p in params) + 2 * largest) / 2**20 + 32


def compare(root: Path, base: str, engine: str, vocab: int, *, train: bool = True, **kw) -> dict:
    started = time.perf_counter()
    new, new_mb = measured(lambda: engine_for(root, base, engine, meta=True, **kw))
    old, old_mb = measured(lambda: engine_for(root, base, engine, meta=False, **kw))
    result = {"differing": tensors_equal(new, old), "new_mb": new_mb, "today_mb": old_mb, "bound_mb": bound_mb(new)}
    if train:
        task = kw.get("task", "causal_lm")
        a, b = train_two_steps(new, vocab, task), train_two_steps(old, vocab, task)
        result["adapter_differs"] = [n for n in a if not torch.equal(a[n], b[n])]
        result["trained"] = sorted(n for n in a if not n.endswith("spra_values"))
    if base == "tied":
        model = new.model
        result["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    result["seconds"] = time.perf_counter() - started
    return result


def main(root: str, out: str, only: list[str]) -> None:
    root = Path(root)
    init_distributed()
    import deepspeed

    deepspeed.init_distributed("gloo")  # its shared-memory buffers are mapped now, outside any measurement
    if world()[0] == 0:
        save_bases(root)
    dist.barrier()
    cases = {
        "fsdp2_big": lambda: compare(root, "big", "fsdp2", BIG["vocab_size"], train=False),
        "zero3_big": lambda: compare(root, "big", "zero3", BIG["vocab_size"], train=False),
        "fsdp2_tied": lambda: compare(root, "tied", "fsdp2", SMALL["vocab_size"]),
        "fsdp2_head": lambda: compare(root, "bert", "fsdp2", SMALL["vocab_size"], task="classification",
                                      head=("classifier",)),
        "zero3_head": lambda: compare(root, "bert", "zero3", SMALL["vocab_size"], task="classification",
                                      head=("classifier",)),
        "zero3_bf16": lambda: compare(root, "tied", "zero3", SMALL["vocab_size"], mixed_precision="bf16"),
    }
    results = {name: cases[name]() for name in (only or cases)}
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, results)
    if world()[0] == 0:
        Path(out).write_text(json.dumps({"world_size": world()[1], "ranks": gathered}, indent=1))
    shutdown()
    exit_rank(0)  # as spra train leaves: no interpreter finalization while DeepSpeed's threads run


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
