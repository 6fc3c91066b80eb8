"""Benchmarks against PEFT LoRA/SHiRA: step time, memory, mask rebuild, adapter size (``python -m bench.run_all``)."""
