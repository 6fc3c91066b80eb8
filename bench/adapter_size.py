"""Adapter file sizes of spra_dist, PEFT LoRA and PEFT SHiRA at equal trainable parameters (LoRA r=8 budget).

    HF_HUB_OFFLINE=1 python -m bench.adapter_size --layers 30     # SmolLM2-135M: 30 layers
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from bench._worker import TARGETS, apply_method, build_model

# The files each library writes: (weights, config).
FILES = {"spra": ("adapter.safetensors", "adapter_config.json"),
         "lora": ("adapter_model.safetensors", "adapter_config.json"),
         "shira": ("adapter_model.safetensors", "adapter_config.json")}


def adapter_files(method: str, layers: int) -> dict:
    model, _ = build_model("smollm2", layers)
    model = apply_method(model, method, TARGETS["smollm2"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as d:
        if method == "spra":
            from spra_dist.adapters.files import save_adapter

            save_adapter(model, os.path.join(d, "a"))
        else:
            model.save_pretrained(os.path.join(d, "a"))
        weights, config = (os.path.getsize(os.path.join(d, "a", f)) for f in FILES[method])
    k = sum(p.numel() for p in trainable)
    bytes_per_value = trainable[0].element_size()
    return {"method": method, "k": k, "bytes_per_value": bytes_per_value, "weights_bytes": weights,
            "config_bytes": config, "overhead_bytes": weights + config - k * bytes_per_value}


def measure(layers: int, log=print) -> list[dict]:
    rows = []
    for method in FILES:
        rows.append(adapter_files(method, layers))
        r = rows[-1]
        log(f"  adapter {method}: k={r['k']:,} weights {r['weights_bytes']:,} B, config {r['config_bytes']:,} B")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    print(json.dumps(measure(ap.parse_args().layers), indent=1))


if __name__ == "__main__":
    main()
