"""Is packing safe for this model? A probe, not a list of names: two documents in one row must give the
second the same logits as alone.

transformers' Llama-style models (Llama, Mistral, Qwen2, SmolLM2, ...) honour position ids that restart per
document, when no attention_mask is passed, in their eager, SDPA and flash-attention paths
(masking_utils.find_packed_sequence_indices). A model whose attention ignores them would let packed documents
attend to each other; training on it would silently differ from unpacked training, so it is refused.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def check_packing(model: nn.Module) -> None:
    """ValueError when ``model`` lets packed documents attend to each other."""
    vocab = model.config.vocab_size
    first = torch.arange(3, 9) % vocab
    second = torch.arange(11, 16) % vocab
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=torch.cat([first, second])[None],
                       position_ids=torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None],
                       use_cache=False).logits[0, len(first):].float()
        alone = model(input_ids=second[None], position_ids=torch.arange(len(second))[None],
                      use_cache=False).logits[0].float()
    except (TypeError, ValueError) as err:
        raise ValueError(f"data.sample_packing=true: {type(model).__name__} does not take position_ids ({err}); "
                         "set sample_packing=false") from None
    finally:
        model.train(was_training)
    tol = 1e-3 if packed.dtype == torch.float32 and model.dtype == torch.float32 else 5e-2
    gap = float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6))
    if gap > tol:
        impl = getattr(model.config, "_attn_implementation", None)
        raise ValueError(f"data.sample_packing=true: {type(model).__name__} (attention {impl}) lets packed "
                         f"documents attend to each other (relative logit gap {gap:.2g}); use a model whose "
                         "attention honours restarting position ids (Llama, Mistral, Qwen2, SmolLM2) or "
                         "sample_packing=false")
