import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # tests share tiny_models.py, tiny_run.py, tree.py
# Every subprocess a test starts finds the tools of this environment first (ninja above all: two ninja versions
# alternating on one torch extension cache make each other rebuild DeepSpeed's JIT ops, ~50 s each time).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

from tree import tree_hash  # noqa: E402  (after the path above)


@pytest.fixture(scope="session")
def _tiny_run_trained(tmp_path_factory) -> dict:
    """Train the debug tiny Llama once (tests/tiny_run.py): the run, the hash of the folder that holds it, and
    the first test that changed it (None while none has)."""
    from tiny_run import train_argv

    from spra_dist.cli import main

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    assert main(train_argv(out)) == 0
    return {"run": out, "hash": tree_hash(out.parent), "changed_by": None}


def _check_unchanged(shared: dict) -> None:
    if shared["changed_by"]:
        pytest.fail(f"{shared['changed_by']} changed the shared run {shared['run']}, so this test would not read "
                    f"the trained run", pytrace=False)


@pytest.fixture
def tiny_run(_tiny_run_trained, request) -> Iterator[Path]:
    """The shared run directory (adapter/, base_model/, checkpoints/, metrics.jsonl, summary.json, ...), to
    read only: a test that changes anything in it or beside it fails at teardown. Use ``tiny_run_copy`` to
    train on, damage or write into a run."""
    shared = _tiny_run_trained
    _check_unchanged(shared)
    yield shared["run"]
    if not shared["changed_by"] and tree_hash(shared["run"].parent) != shared["hash"]:
        shared["changed_by"] = request.node.nodeid
        pytest.fail(f"this test changed the shared run {shared['run']}, which later tests read: give it "
                    f"tiny_run_copy (a copy of its own) instead of tiny_run", pytrace=False)


@pytest.fixture
def tiny_run_copy(_tiny_run_trained, tmp_path) -> Path:
    """A copy of the shared run at ``tmp_path / "run"``, for the test to change as it likes."""
    _check_unchanged(_tiny_run_trained)
    return Path(shutil.copytree(_tiny_run_trained["run"], tmp_path / "run"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny causal Llama checkpoint with its tokenizer (a classifier built on it has a head it lacks)."""
    import transformers as tf
    from tiny_models import tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_base")
    config = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=32, pad_token_id=0)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
