"""Adapters as files and as named states of one base model.

    files.py   save_adapter / load_adapter / read_adapter: adapter.safetensors + adapter_config.json
    named.py   several adapters per base: set_adapter, disable_adapter, delete_adapter, combine_adapters
    base.py    what an adapter records of its base, and the check that a base is that one
    merge.py   merge_adapter: deltas folded into the weights in memory, under any engine
    export.py  spra merge: a checked base plus adapters, written as a plain Hugging Face model directory
"""
