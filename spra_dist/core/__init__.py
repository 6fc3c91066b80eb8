"""The method: which entries train, and the layer that trains them.

    config.py    SpraConfig: targets, budget (LoRA-rank or density), mask seed, value dtype
    masks.py     sample_indices: the mask as a pure function of (seed, key, numel, k); budgets; fingerprints
    layer.py     SpraLinear: merged-weight forward, sampled (SDDMM) backward, merge / unmerge
    kernels/     the layer's custom ops and the values' gradient (sampled_addmm, Triton, a C++ kernel)
    model.py     apply_spra: target selection, injection, freezing
    registry.py  the one SpaRA state object a model carries: its adapters and which one is active
"""
