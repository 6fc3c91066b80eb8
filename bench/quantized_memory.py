"""Memory of a SpaRA step over a 4-bit base: torchao NF4 against bf16, and PEFT LoRA over bitsandbytes 4-bit.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quantized_memory                  # all arms, side by side, a table
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quantized_memory --trim           # the same, heap trimmed before steps
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quantized_memory --mmap-threshold 131072   # RSS = live bytes
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quantized_memory --arm spra_nf4   # one arm in this process, a JSON line

SmolLM2-135M's real weights and shape (all 30 layers, ``spra_dist.demos.packaged.smollm2_dir()``), batch 4 × 256
random token ids (seeded, the same for every arm), every attention and MLP linear adapted at the LoRA r=8 budget
(the tied embedding / LM head, the norms stay bf16). Each arm runs in a fresh process per round, so its peak RSS
is its own, and the rounds interleave the arms (A B C D A B C D):

- ``spra_bf16``: SpaRA over the model in bf16;
- ``spra_nf4``: the same, then ``quantize_targets(model, "nf4")`` (torchao NF4, blocks of 64, double-quantized
  scales);
- ``lora_bnb4``: PEFT LoRA r=8 all-linear over ``from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True,
  nf4, bf16 compute and storage))``, as QLoRA;
- ``spra_bnb4``: SpaRA over that same bitsandbytes base (``apply_spra`` reads its ``Params4bit`` weights).

Everything computes in bf16 (no autocast). Per arm: warm-up steps, then timed steps of forward + backward +
AdamW. Figures: the bytes the adapted linears' frozen weights hold (every tensor of the packed form counted once:
data, scales, their factors, lookup tables), the time and RSS (``VmRSS``) after loading and adapting (quantizing
included), the peak RSS of the steps (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model is built),
the process's peak (``ru_maxrss``, loading included: the checkpoint is fp32), the median step time, and, after
the steps, the bytes autograd keeps for backward in one forward (``bench.profile_model.saved_bytes``).
``--trim`` calls glibc's ``malloc_trim(0)`` between building and the steps, which separates what the model holds
from the freed heap that building it left behind; ``--mmap-threshold`` pins glibc's mmap threshold in each arm, so
every block over it goes back to the system when freed and RSS follows the live bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.proc_memory import reset_peak, rss, run_fresh
from bench.profile_model import saved_bytes
from spra_dist.core.quantized import is_bnb_4bit, is_nf4, logical_shape

ARMS = {"spra_bf16": "SpaRA, bf16 base", "spra_nf4": "SpaRA, NF4 base (torchao)",
        "lora_bnb4": "PEFT LoRA r=8, bnb 4-bit base", "spra_bnb4": "SpaRA, bnb 4-bit base"}
LORA_RANK = 8
MIB = 2**20


def load(arm: str, model_dir: str) -> nn.Module:
    """The base in bf16, or with every linear but the head in bitsandbytes 4-bit for the ``*_bnb4`` arms."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if arm.endswith("_bnb4"):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_quant_storage=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)


def adapt(model: nn.Module, arm: str) -> nn.Module:
    """The arm's adapter at the r=8 budget on every linear but the output head."""
    if arm == "lora_bnb4":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                                target_modules="all-linear"))
    from spra_dist import SpraConfig, apply_spra
    from spra_dist.core.model import quantize_targets

    model = apply_spra(model, SpraConfig(lora_rank=LORA_RANK, target_modules="all-linear", seed=0))
    if arm == "spra_nf4":
        quantize_targets(model, "nf4")
    return model


def adapted_weights(model: nn.Module) -> Iterator[Tensor]:
    """The frozen weight of every adapted linear (SpraLinear, or PEFT LoRA's base layer)."""
    from spra_dist.core.layer import SpraLinear

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT: no LoRA arm to count
        LoraLayer = ()  # noqa: N806
    for m in model.modules():
        if isinstance(m, SpraLinear):
            yield m.weight
        elif isinstance(m, LoraLayer):
            yield m.get_base_layer().weight


def weight_tensors(w: Tensor) -> list[Tensor]:
    """Every tensor a frozen weight holds: NF4's packed data, int8 scales, their factors, mean and lookup
    table; bitsandbytes' packed data and its quant state (absmax, code, and the nested state's); else itself."""
    if is_nf4(w):
        return [w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4]
    if is_bnb_4bit(w):
        out, states = [w.data], [w.quant_state]
        while states:
            state = states.pop()
            out += [v for v in vars(state).values() if isinstance(v, Tensor)]
            states += [v for v in vars(state).values() if type(v).__name__ == "QuantState"]
        return out
    return [w.detach()]


def held_bytes(weights: Iterator[Tensor] | list[Tensor]) -> dict:
    """Bytes held by ``weights`` (each storage counted once, so a shared table counts once), and what the same
    matrices take in bf16 (2 bytes a value)."""
    storages: dict[int, int] = {}
    values = 0
    for w in weights:
        rows, cols = logical_shape(w)
        values += rows * cols
        for t in weight_tensors(w):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return {"held": sum(storages.values()), "bf16": 2 * values, "values": values}


def _malloc_trim() -> bool:
    """Hand glibc's free heap back to the system (``malloc_trim(0)``); False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False


def measure(arm: str, model_dir: str, *, batch: int, seq: int, steps: int, warmup: int, trim: bool = False) -> dict:
    """Build the arm's model in this process, then ``warmup`` + ``steps`` steps of forward + backward + AdamW;
    with ``trim``, glibc's free heap is handed back between the two (``malloc_trim``), so the steps start from
    what the model holds rather than from what building it left in the allocator."""
    start = time.perf_counter()
    model = adapt(load(arm, model_dir), arm).train()
    build_s = time.perf_counter() - start
    weights = held_bytes(adapted_weights(model))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    built = rss("VmRSS")
    trimmed = rss("VmRSS") if trim and _malloc_trim() else None
    reset = reset_peak()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_peak = rss("VmHWM") if reset else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saved = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss)  # after the peaks are read
    return {"arm": arm, "batch": batch, "seq": seq, "layers": model.config.num_hidden_layers,
            "trainable": sum(p.numel() for p in params), "weights": weights, "build_s": build_s,
            "rss_built": built, "rss_trimmed": trimmed, "step_peak_rss": step_peak, "saved": saved, "peak_rss": peak,
            "step_s": times, "median_s": statistics.median(times), "threads": torch.get_num_threads()}


def run_arm(arm: str, model_dir: str, *, trim: bool = False, mmap_threshold: int | None = None, **sizes) -> dict:
    """``measure`` in a fresh process (its own peak RSS), glibc's mmap threshold pinned there when given; the
    machine's load average before it starts."""
    cmd = [sys.executable, "-m", "bench.quantized_memory", "--arm", arm, "--model-dir", model_dir,
           *[f"--{k}={v}" for k, v in sizes.items()], *(["--trim"] if trim else [])]
    # read by glibc at start-up: blocks above it are mmapped and unmapped on free
    threshold = {} if mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
    return run_fresh(cmd, **threshold)


def combine(outs: list[dict]) -> dict:
    """One arm's processes (``measure`` results) as one row: each memory figure as the list of its processes' values
    (the table shows their range; ratios take the largest), every timed step pooled for ``median_s``, and the
    quietest process's median, ``best_s``: other work on the machine only ever adds time (on 2 busy cores a
    process's steps can take several times as long), so the lowest per-process median is the one to compare."""
    first = outs[0]
    steps = [t for o in outs for t in o["step_s"]]
    lists = {k: [o[k] for o in outs if o.get(k) is not None]
             for k in ("build_s", "rss_built", "rss_trimmed", "step_peak_rss", "peak_rss", "load_before")}
    return {**{k: first[k] for k in ("arm", "layers", "threads", "trainable", "weights", "saved")}, **lists,
            "step_s": steps, "median_s": statistics.median(steps), "round_medians": [o["median_s"] for o in outs],
            "best_s": min(o["median_s"] for o in outs)}


def _mib(values: list[int]) -> str:
    lo, hi = min(values) / MIB, max(values) / MIB
    return f"{hi:,.0f}" if round(lo) == round(hi) else f"{lo:,.0f}–{hi:,.0f}"


def _span(values: list[float]) -> str:
    lo, hi = f"{min(values, default=0):.1f}", f"{max(values, default=0):.1f}"
    return lo if lo == hi else f"{lo}–{hi}"


def table(rows: list[dict]) -> list[str]:
    """The arms (``combine``d) side by side, weights and peaks also as a multiple of the bf16 arm's."""
    base = next((r for r in rows if r["arm"] == "spra_bf16"), None)

    def x(r: dict, key: str) -> str:
        return f"{max(r[key]) / max(base[key]):.2f}" if base and r[key] and base[key] else "–"

    def x_time(r: dict) -> str:
        return f"{r['best_s'] / base['best_s']:.2f}" if base else "–"

    lines = ["| arm | trainable | adapted weights held (MiB) | × bf16 | load + adapt (s) | RSS after it (MiB) "
             "| saved for backward (MiB) | peak RSS, steps (MiB) | × bf16 | median step, quietest process (s) | × bf16 "
             "| per-process medians (s) | load before |", "|---|" + "---:|" * 11 + "---|---:|"]
    for r in rows:
        w = r["weights"]
        built = _mib(r["rss_built"]) + (f" ({_mib(r['rss_trimmed'])} trimmed)" if r["rss_trimmed"] else "")
        lines.append(f"| {ARMS[r['arm']]} | {r['trainable']:,} | {w['held'] / MIB:.1f} | {w['held'] / w['bf16']:.3f} "
                     f"| {statistics.median(r['build_s']):.0f} | {built} | {r['saved'] / MIB:,.0f} | "
                     f"{_mib(r['step_peak_rss']) if r['step_peak_rss'] else '–'} | {x(r, 'step_peak_rss')} | "
                     f"{r['best_s']:.2f} | {x_time(r)} | "
                     f"{', '.join(f'{t:.2f}' for t in r['round_medians'])} | "
                     f"{_span(r['load_before'])} |")
    return lines


def target_line(rows: list[dict]) -> str:
    """The issue's target: the NF4 arm's adapted weights at most 0.3 × the bf16 arm's; and its peaks'."""
    by = {r["arm"]: r for r in rows}
    if "spra_nf4" not in by or "spra_bf16" not in by:
        return ""
    nf4, bf16 = by["spra_nf4"], by["spra_bf16"]
    ratio = nf4["weights"]["held"] / bf16["weights"]["held"]
    peaks = [f"{what} {max(nf4[key]) / max(bf16[key]):.2f} × bf16's" for what, key in
             (("peak RSS of the steps", "step_peak_rss"), ("of the process", "peak_rss")) if nf4[key]]
    return (f"NF4 weights held {ratio:.3f} × bf16's (≤ 0.3: {'holds' if ratio <= 0.3 else 'does not hold'}); "
            + ", ".join(peaks))


def tiny_checkpoint(path: str | Path) -> str:
    """A tiny random Llama written as a transformers checkpoint (rows of whole NF4 blocks): the arms' quick check."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=512, num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def measure_all(model_dir: str, *, label: str = "SmolLM2-135M", arms: tuple[str, ...] = tuple(ARMS), rounds: int = 2,
                batch: int, seq: int, steps: int, warmup: int, trim: bool = False, mmap_threshold: int | None = None,
                log=print) -> dict:
    """Each arm in ``rounds`` fresh processes, interleaved (A B C D A B C D …, so drift in the machine's load hits
    every arm alike); what ``table`` and ``target_line`` read."""
    outs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for i in range(rounds):
        for arm in arms:
            r = run_arm(arm, model_dir, batch=batch, seq=seq, steps=steps, warmup=warmup, trim=trim,
                        mmap_threshold=mmap_threshold)
            log(f"  round {i + 1}/{rounds} {arm:<10} median step {r['median_s']:.2f} s  peak RSS "
                f"{r['peak_rss'] / MIB:,.0f} MiB  adapted weights {r['weights']['held'] / MIB:.1f} MiB  "
                f"load {r['load_before']:.1f}")
            outs[arm].append(r)
    rows = [combine(o) for o in outs.values()]
    return {"label": label, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "rounds": rounds,
            "trim": trim, "mmap_threshold": mmap_threshold, "layers": rows[0]["layers"], "threads": rows[0]["threads"],
            "arms": rows, "processes": outs}


def report(res: dict) -> list[str]:
    """The heading line, the table and the target, as docs/benchmarks.md shows them."""
    rounds = f"{res['rounds']} rounds interleaved" if res["rounds"] > 1 else "one round"
    return [f"**{res['label']}, {res['layers']} layers, batch {res['batch']} × {res['seq']}, bf16** (a fresh process "
            f"per arm and round, {rounds}; {res['warmup']} warm-up + {res['steps']} timed steps each; "
            f"{res['threads']} threads"
            + ("; free heap handed back after building, `--trim`" if res.get("trim") else "")
            + (f"; `MALLOC_MMAP_THRESHOLD_={res['mmap_threshold']}`" if res.get("mmap_threshold") else "") + ")", "",
            *table(res["arms"]), "", "- " + target_line(res["arms"]), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=ARMS, help="one arm in this process (prints one JSON line)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--model-dir", help="a transformers checkpoint (default: the packaged SmolLM2-135M)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per arm, interleaved")
    ap.add_argument("--json", help="also write every process's figures to this file")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) between building the model and the steps")
    ap.add_argument("--mmap-threshold", type=int, help="pin glibc's mmap threshold (bytes) in each arm's process")
    a = ap.parse_args()
    if a.model_dir is None:
        from spra_dist.demos.packaged import smollm2_dir

        a.model_dir = str(smollm2_dir())
    sizes = dict(batch=a.batch, seq=a.seq, steps=a.steps, warmup=a.warmup)
    if a.arm:
        print(json.dumps(measure(a.arm, a.model_dir, **sizes, trim=a.trim)))
        return
    res = measure_all(a.model_dir, arms=tuple(a.arms.split(",")), rounds=a.rounds, **sizes, trim=a.trim,
                      mmap_threshold=a.mmap_threshold, log=lambda m: print(m, file=sys.stderr))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(report(res)))


if __name__ == "__main__":
    main()
