import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # tests share tiny_models.py
# Every subprocess a test starts finds the tools of this environment first (ninja above all: two ninja versions
# alternating on one torch extension cache make each other rebuild DeepSpeed's JIT ops, ~50 s each time).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
