"""The data pipeline: your files (or a bundled source) -> tokens with per-token labels -> batches.

    codec.py     the tokenizer interface the pipeline needs (a transformers tokenizer, or bytes for tiny models)
    load.py      files, globs, directories, save_to_disk folders -> a datasets.Dataset; splits and column_map
    formats.py   one builder per type: text, completion, alpaca, classification (and the bundled blocks)
    chat.py      type chat: templates, roles, the trained turns and their end-of-turn tokens
    cache.py     the tokenised Arrow cache: its key, and one rank building it while the others wait
    tokens.py    TokenSet (Arrow-backed), packing, batch order, collate
    packing.py   the probe that a model keeps packed documents apart
    build.py     build_data: the path from a DataConfig to the train and eval TokenSets

The bundled sources (rotten_tomatoes, text_file, synthetic) live in ``spra_dist.demos.sources``.

Modules are imported by name (``from spra_dist.data.build import build_data``); this package imports none of
them, so ``spra_dist.data.config`` stays light for the config loader.
"""
