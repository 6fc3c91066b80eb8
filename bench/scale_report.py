"""The tables ``python -m bench.scale`` prints (markdown, as docs/scale.md keeps them): memory per GPU of SpaRA and
PEFT LoRA under FSDP2 from the simulated rows, SpaRA over an NF4 base beside a bf16 one, the mask state, a
closed-form ZeRO-3 estimate and SpaRA's start-up.
"""

from __future__ import annotations

MIB, GIB = 2**20, 2**30
ZERO3_TRAINED_BYTES = 18
"""Per trained value under DeepSpeed ZeRO-3 with bf16 and Adam: the bf16 copy it computes with (2), the fp32 master
(4), its fp32 gradient (4) and two fp32 Adam moments (8). A frozen bf16 weight costs 2."""
NAMES = {"8b": "Llama-3-8B", "70b": "Llama-3-70B", "405b": "Llama-3.1-405B"}


def size(n: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB; nothing as 0."""
    if n == 0:
        return "0"
    return f"{n / MIB:.1f} MiB" if n < GIB else f"{n / GIB:.2f} GiB"


def adapter_state(row: dict) -> int:
    """What stays on the GPU for the adapter through the run: values, gradients, Adam moments, the resident mask."""
    return row["values"] + row["grads"] + row["adam"] + row["mask_device"]


def peak(row: dict, ckpt: bool) -> int:
    """The tracker's peak plus what it can't see: the resident mask, and the per-use mask copies at their peak."""
    return row["ckpt" if ckpt else "no_ckpt"]["Total"] + row["mask_device"] + row["mask_transient_peak"]


def dense_base(rows: list[dict]) -> list[dict]:
    """The rows over an unquantized (bf16) base: the ones the method tables and ZeRO-3 compare."""
    return [r for r in rows if r.get("quantize_base", "none") == "none"]


def _pairs(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(model, r, world, rank): {method: row}}, in the order the rows came."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        out.setdefault((r["model"], r["lora_rank"], r["world"], r["rank"]), {})[r["method"]] = r
    return out


def nf4_table(rows: list[dict]) -> list[str]:
    """SpaRA over an NF4 base beside SpaRA over the bf16 base, per (model, r), world size and rank."""
    spra = [r for r in rows if r["method"] == "spra"]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in spra:
        cells.setdefault((r["model"], r["lora_rank"], r["world"], r["rank"]), {})[r["quantize_base"]] = r
    lines, current = [], None
    for (model, r, world, rank), bases in cells.items():
        if "nf4" not in bases:
            continue
        if (model, r) != current:
            current = (model, r)
            seq, batch = bases["nf4"]["seq"], bases["nf4"]["batch"]
            title = f"**{NAMES.get(model, model)}, SpaRA r = {r}** (sequence {seq}, micro batch {batch}; per GPU)"
            lines += ["", title, "", "| ranks | rank | base | base shard | values | grads | Adam | all-gather "
                      "| unsharded | activations | act., ckpt | peak | peak, ckpt |",
                      "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for base in ("none", "nf4"):
            if base not in bases:
                continue
            row = bases[base]
            lines.append(
                f"| {world} | {rank} | {'NF4' if base == 'nf4' else 'bf16'} | {size(row['base_shard'])} "
                f"| {size(row['values'])} | {size(row['grads'])} | {size(row['adam'])} | {_gathered_cells(row)} |")
    return lines + [""]


def _gathered_cells(row: dict) -> str:
    """The cells every memory table ends with: all-gather, unsharded, activations without and with checkpointing,
    and the two peaks."""
    ck, no = row["ckpt"], row["no_ckpt"]
    cells = [ck["All Gather"], ck["Unsharded Param"], no["Activation"], ck["Activation"], peak(row, False),
             peak(row, True)]
    return " | ".join(size(c) for c in cells)


def memory_tables(rows: list[dict]) -> list[str]:
    """One table per (model, r): each world size and rank, SpaRA above LoRA, every category per GPU."""
    lines, current = [], None
    for (model, r, world, rank), methods in _pairs(rows).items():
        if (model, r) != current:
            current = (model, r)
            seq, batch = next(iter(methods.values()))["seq"], next(iter(methods.values()))["batch"]
            lines += ["", f"**{NAMES.get(model, model)}, r = {r}** (sequence {seq}, micro batch {batch}; per GPU)", "",
                      "| ranks | rank | method | base shard | values | grads | Adam | device mask | resident adapter "
                      "| ratio | all-gather | unsharded | activations | act., ckpt | peak | peak, ckpt |",
                      "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lora = methods.get("lora")
        for method in ("spra", "lora"):
            if method not in methods:
                continue
            row = methods[method]
            ratio = f"{adapter_state(row) / adapter_state(lora):.2f}" if lora and method == "spra" else ""
            lines.append(
                f"| {world} | {rank} | {'SpaRA' if method == 'spra' else 'LoRA'} | {size(row['base_shard'])} "
                f"| {size(row['values'])} | {size(row['grads'])} | {size(row['adam'])} | {size(row['mask_device'])} "
                f"| {size(adapter_state(row))} | {ratio} | {_gathered_cells(row)} |")
    return lines + [""]


def mask_table(rows: list[dict]) -> list[str]:
    """SpaRA's mask per GPU (the same on every rank and at every world size)."""
    lines = ["| model | r | trained values k | mask residency | device mask | host mask | transient peak |",
             "|---|---:|---:|---|---:|---:|---:|"]
    seen = set()
    for row in rows:
        key = (row["model"], row["lora_rank"], row.get("mask_residency"))
        if row["method"] != "spra" or key in seen:
            continue
        seen.add(key)
        lines.append(f"| {NAMES.get(row['model'], row['model'])} | {row['lora_rank']} | {row['trainable']:,} "
                     f"| {row['mask_residency']} | {size(row['mask_device'])} | {size(row['mask_host'])} "
                     f"| {size(row['mask_transient_peak'])} |")
    return lines + [""]


def zero3(rows: list[dict]) -> list[dict]:
    """ZeRO-3's model states per GPU in closed form, frozen and trained parameters counted apart."""
    out, seen = [], set()
    for (model, r, world, _), methods in _pairs(rows).items():
        if (model, r, world) in seen:
            continue
        seen.add((model, r, world))
        any_row = next(iter(methods.values()))
        frozen, trained = any_row["frozen"], any_row["trainable"]
        spra_mask = methods["spra"]["mask_device"] if "spra" in methods else None
        base = 2 * frozen / world + ZERO3_TRAINED_BYTES * trained / world
        out.append({"model": model, "lora_rank": r, "world": world, "frozen": frozen, "trainable": trained,
                    "frozen_bytes": 2 * frozen / world, "trained_bytes": ZERO3_TRAINED_BYTES * trained / world,
                    "spra_mask_device": spra_mask, "spra": None if spra_mask is None else base + spra_mask,
                    "lora": base, "all_trained": ZERO3_TRAINED_BYTES * (frozen + trained) / world})
    return out


def zero3_table(estimates: list[dict]) -> list[str]:
    lines = ["Per GPU = frozen × 2 B / ranks + trained × 18 B / ranks (bf16 copy 2, fp32 value 4, fp32 gradient 4, "
             "Adam 8) + SpaRA's device mask. Model states only: add activations and gathered layers as above.", "",
             "DeepSpeed's own `estimate_zero3_model_states_mem_needs` assumes every parameter trains (18 B each); "
             "its figure is the last column.", "",
             "| model | r | ranks | frozen (bf16) | trained | SpaRA device mask | SpaRA | LoRA "
             "| every parameter trained |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in estimates:
        mask = "" if e["spra"] is None else size(e["spra_mask_device"])
        spra = "" if e["spra"] is None else size(e["spra"])
        lines.append(f"| {NAMES.get(e['model'], e['model'])} | {e['lora_rank']} | {e['world']} "
                     f"| {size(e['frozen_bytes'])} | {size(e['trained_bytes'])} | {mask} | {spra} | {size(e['lora'])} "
                     f"| {size(e['all_trained'])} |")
    return lines + [""]


def startup_table(rows: list[dict]) -> list[str]:
    lines = ["| model | r | trained values k | `apply_spra` on the meta model (s) | threads | host mask "
             "| peak RSS growth |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        lines.append(f"| {NAMES.get(s['model'], s['model'])} | {s['lora_rank']} | {s['k']:,} | {s['apply_s']:.1f} "
                     f"| {s['threads']} | {size(s['mask_host'])} | {size(s['peak_rss_growth'])} |")
    return lines + [""]


def headline(rows: list[dict], *, model: str = "70b", r: int = 8, world: int = 64) -> str | None:
    """The figure that matters: resident adapter state per GPU, SpaRA against LoRA, at 70B, r = 8, 64 ranks."""
    methods = _pairs(rows).get((model, r, world, 0), {})
    if "spra" not in methods or "lora" not in methods:
        return None
    spra, lora = adapter_state(methods["spra"]), adapter_state(methods["lora"])
    return (f"{NAMES[model]}, r = {r}, {world} ranks, rank 0: resident adapter state per GPU {size(spra)} (SpaRA, "
            f"mask_residency={methods['spra']['mask_residency']}) vs {size(lora)} (LoRA): ratio {spra / lora:.2f}")
