"""The data pipeline (spra_dist.data): each type's tokens and labels, packing, the cache, the loss's
denominator, evaluation metrics. Tiny models and byte-level tokens, so expectations are written out exactly."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from spra_dist.data.build import build_data
from spra_dist.data.chat import CHATML
from spra_dist.data.codec import BYTE_BOS, BYTE_EOS, ByteCodec
from spra_dist.data.tokens import collate
from spra_dist.train.config import load_config
from spra_dist.train.models import build_model

DATA = Path(__file__).parent / "data"
IGN = -100


def config(tmp_path, data: dict, *, task="causal_lm", **top):
    body = {"model": {"source": "tiny_llama", "task": task},
            "data": {"dataset_prepared_path": str(tmp_path / "cache"), **data}, **top}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_config(path)


def splits_of(tmp_path, data: dict, *, task="causal_lm", codec=None, num_labels=2):
    cfg = config(tmp_path, data, task=task)
    return build_data(cfg.data, task=task, codec=codec or ByteCodec(), num_labels=num_labels)


def as_bytes(text: str) -> list[int]:
    return list(text.encode())


def trained_text(example) -> str:
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    return bytes(t for t, lab in pairs if lab != IGN and t < 256).decode()


def entries(path, type_, **extra):
    return [{"path": str(path), "type": type_, **extra}]


def test_text_trains_every_token_and_ends_with_eos(tmp_path):
    s = splits_of(tmp_path, {"datasets": entries(DATA / "text.jsonl", "text"), "eval_datasets":
                             entries(DATA / "text.jsonl", "text")})
    ex = s.eval.example(0)
    assert ex["input_ids"] == [BYTE_BOS, *as_bytes("The cat sat."), BYTE_EOS]
    assert ex["labels"] == [IGN, *ex["input_ids"][1:]]  # BOS is never a target
    assert ex["n_trained"] == len(ex["input_ids"]) - 1


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_completion_masks_the_prompt(tmp_path, train_on_inputs):
    s = splits_of(tmp_path, {"datasets": entries(DATA / "completion.jsonl", "completion"),
                             "eval_datasets": entries(DATA / "completion.jsonl", "completion"),
                             "train_on_inputs": train_on_inputs})
    ex = s.eval.example(0)
    prompt = as_bytes("Q: 2+2?\nA:")
    assert ex["input_ids"] == [BYTE_BOS, *prompt, *as_bytes(" 4"), BYTE_EOS]
    head = prompt if train_on_inputs else [IGN] * len(prompt)
    assert ex["labels"] == [IGN, *head, *as_bytes(" 4"), BYTE_EOS]


def test_alpaca_prompt_with_and_without_input(tmp_path):
    s = splits_of(tmp_path, {"datasets": entries(DATA / "alpaca.jsonl", "alpaca"),
                             "eval_datasets": entries(DATA / "alpaca.jsonl", "alpaca"), "max_length": 512})
    plain, with_input = s.eval.example(0), s.eval.example(1)
    assert bytes(plain["input_ids"][1:-1]).decode().endswith("### Instruction:\nSay hi.\n\n### Response:\nHi!")
    assert "### Input:\n2 3\n\n### Response:\n5" in bytes(with_input["input_ids"][1:-1]).decode()
    assert trained_text(plain) == "Hi!" and plain["labels"][-1] == BYTE_EOS
    assert trained_text(with_input) == "5"


def test_chat_trains_every_assistant_turn_with_its_end_of_turn(tmp_path):
    with pytest.warns(UserWarning, match="'<|im_end|>' but the tokenizer's EOS is '</s>'"):
        s = splits_of(tmp_path, {"datasets": entries(DATA / "chat.jsonl", "chat"),
                                 "eval_datasets": entries(DATA / "chat.jsonl", "chat"), "chat_template": "chatml",
                                 "max_length": 512})
    ex = s.eval.example(0)
    text = bytes(ex["input_ids"]).decode()
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\nCiao<|im_end|>\n")
    expected = [IGN] * len(ex["input_ids"])
    for answer in ("Hello<|im_end|>", "Ciao<|im_end|>"):  # both turns (not only the last), eot included
        at = text.index(answer)
        expected[at: at + len(answer)] = as_bytes(answer)
    assert ex["labels"] == expected
    assert s.end_of_turn == "<|im_end|>"


def test_chat_roles_to_train_and_sharegpt_mapping(tmp_path):
    entry = entries(DATA / "sharegpt.json", "chat", column_map={"messages": "conversations", "role": "from",
                                                               "content": "value"},
                    roles={"assistant": ["bot_reply"]}, roles_to_train=["user"])
    with pytest.warns(UserWarning, match="end-of-turn"):
        s = splits_of(tmp_path, {"datasets": entry, "eval_datasets": entry, "chat_template": "chatml",
                                 "max_length": 512})
    assert [trained_text(s.eval.example(i)) for i in range(3)] == ["Hi<|im_end|>", "2+2?<|im_end|>",
                                                                   "Sky?<|im_end|>"]


def test_chat_with_the_tokenizers_own_template():
    """SmolLM2's template (a default system prompt, ChatML turns): the answer and <|im_end|> are trained."""
    from spra_dist.data import chat
    from spra_dist.data.formats import Prep
    from spra_dist.train.config import ModelConfig
    from spra_dist.train.models import build_codec

    codec = build_codec(ModelConfig(source="smollm2"))
    prep = Prep(codec=codec, max_length=256, excess_length="drop", where="test", template=codec.chat_template,
                roles=chat.role_map({}))
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now"}]
    out = chat.build_chat({"__row__": [0], "messages": [talk]}, prep)
    ids, labels = out["input_ids"][0], out["labels"][0]
    spans, run = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != IGN:
            run.append(t)
        elif run:
            spans.append(run)
            run = []
    eot = codec.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [codec.tokenizer.decode(s) for s in spans] == ["Hello there<|im_end|>", "Bye now<|im_end|>"]
    assert all(s[-1] == eot for s in spans)
    assert codec.tokenizer.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_classification_string_labels_map_to_ids_and_names(tmp_path):
    entry = entries(DATA / "labels.csv", "classification", column_map={"text": "review", "label": "sentiment"})
    s = splits_of(tmp_path, {"datasets": entry, "eval_datasets": entry}, task="classification")
    assert s.label_names == ["bad", "good"]
    assert [s.eval.example(i)["label"] for i in range(3)] == [1, 0, 1]
    assert s.eval.example(2)["input_ids"] == [BYTE_BOS, *as_bytes("great, simply great")]
    s = splits_of(tmp_path, {"datasets": entry, "eval_datasets": entry, "labels": ["good", "bad"]},
                  task="classification")
    assert [s.eval.example(i)["label"] for i in range(3)] == [0, 1, 0]


def test_split_slicing_max_samples_and_val_set_size(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(50)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = splits_of(tmp_path, {"datasets": entries(tmp_path / "rows.jsonl", "text", split="train[10:30]"),
                             "val_set_size": 5})
    assert len(s.train) == 15 and len(s.eval) == 5
    seen = {bytes(s.train.example(i)["input_ids"][1:-1]).decode() for i in range(15)}
    seen |= {bytes(s.eval.example(i)["input_ids"][1:-1]).decode() for i in range(5)}
    assert seen == {f"row {i}" for i in range(10, 30)}
    s = splits_of(tmp_path, {"datasets": entries(tmp_path / "rows.jsonl", "text", max_samples=8),
                             "val_set_size": 0.25})
    assert len(s.train) + len(s.eval) == 8 and len(s.eval) >= 1


def test_save_to_disk_directory_and_glob(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(str(tmp_path / "saved"))
    s = splits_of(tmp_path, {"datasets": entries(tmp_path / "saved", "text", split="train[:2]"),
                             "eval_datasets": entries(DATA / "t*.jsonl", "text", max_samples=1)})
    assert len(s.train) == 2 and len(s.eval) == 1
    with pytest.raises(ValueError, match=r"path='.*\[ac\]\*.jsonl' could not be read as json"):  # mixed columns
        splits_of(tmp_path, {"datasets": entries(DATA / "[ac]*.jsonl", "text"), "val_set_size": 1})


def test_excess_length_drop_truncate_and_untrained_count(tmp_path):
    data = {"datasets": entries(DATA / "completion.jsonl", "completion"),
            "eval_datasets": entries(DATA / "completion.jsonl", "completion"), "max_length": 30}
    s = splits_of(tmp_path, data)  # default for completion: drop; the rows are 15, 32 and 29 tokens
    assert len(s.eval) == 2 and s.stats["eval"]["dropped_over_length"] == 1
    s = splits_of(tmp_path, {**data, "excess_length": "truncate", "max_length": 24})
    # "Q: capital of France?\nA:" is 24 bytes + BOS: cut inside the prompt, nothing trained, dropped and counted
    assert s.stats["eval"]["dropped_untrained"] == 1 and len(s.eval) == 2
    assert s.eval.example(1)["input_ids"][-1] == ord(" ")  # the third row keeps one trained token


def test_packing_restarts_positions_and_keeps_examples_whole(tmp_path):
    s = splits_of(tmp_path, {"datasets": entries(DATA / "completion.jsonl", "completion"),
                             "eval_datasets": entries(DATA / "completion.jsonl", "completion"),
                             "sample_packing": True, "max_length": 64, "val_set_size": None})
    assert sorted(i for p in s.train.packs for i in p) == [0, 1, 2]
    assert all(s.train.lengths() <= 64)
    batch = collate(s.train, list(range(len(s.train))), pad_id=0)
    assert "attention_mask" not in batch
    for row, pack in enumerate(s.train.packs):
        at = 0
        for i in pack:
            n = s.train.example(i)["length"]
            assert batch["position_ids"][row, at: at + n].tolist() == list(range(n))
            assert batch["labels"][row, at] == IGN  # never learn a document's first token from the one before
            at += n


def test_packed_loss_equals_unpacked_per_document(tmp_path):
    cfg = config(tmp_path, {"datasets": entries(DATA / "completion.jsonl", "completion"),
                            "eval_datasets": entries(DATA / "completion.jsonl", "completion"),
                            "sample_packing": True, "max_length": 128})
    model = build_model(cfg.model, seed=0).model.eval()
    s = build_data(cfg.data, task="causal_lm", codec=ByteCodec())
    assert len(s.train) == 1 and len(s.train.packs[0]) == 3
    packed = collate(s.train, [0], pad_id=0)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    at = 0
    for i in s.train.packs[0]:
        ex = s.train.example(i)
        n = ex["length"]
        alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits
        labels = torch.tensor(ex["labels"][1:])
        loss_alone = torch.nn.functional.cross_entropy(alone[0, :-1], labels, ignore_index=IGN)
        loss_packed = torch.nn.functional.cross_entropy(logits[0, at: at + n - 1], labels, ignore_index=IGN)
        assert abs(loss_alone.item() - loss_packed.item()) < 1e-5
        at += n


def test_cache_reused_and_rebuilt_when_an_input_changes(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text((DATA / "completion.jsonl").read_text())
    data = {"datasets": entries(src, "completion"), "val_set_size": 1}

    def cache_dir(**extra):
        return Path(splits_of(tmp_path, {**data, **extra}).stats["cache"])

    first = cache_dir()
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert cache_dir() == first and (first / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert cache_dir(max_length=32) != first
    (tmp_path / "chatml.jinja").write_text(CHATML)
    chat = {"datasets": entries(DATA / "chat.jsonl", "chat"), "val_set_size": 1, "max_length": 512}
    with pytest.warns(UserWarning):
        a = splits_of(tmp_path, {**chat, "chat_template": "chatml"}).stats["cache"]
        (tmp_path / "other.jinja").write_text(CHATML.replace("'\\n' }}{% endfor %}", "'\\n\\n' }}{% endfor %}"))
        b = splits_of(tmp_path, {**chat, "chat_template": str(tmp_path / "other.jinja")}).stats["cache"]
    assert a != b
    time.sleep(0.01)
    src.write_text(src.read_text().replace("Paris", "Lyon"))
    changed = splits_of(tmp_path, data)
    assert Path(changed.stats["cache"]) != first
    texts = [bytes(changed.train.example(i)["input_ids"][1:-1]).decode() for i in range(len(changed.train))]
    texts += [bytes(changed.eval.example(i)["input_ids"][1:-1]).decode() for i in range(len(changed.eval))]
    assert any("Lyon" in t for t in texts) and not any("Paris" in t for t in texts)


def test_waiting_rank_reports_rank0_error_and_a_dead_builder(tmp_path):
    from spra_dist.data import cache

    (tmp_path / "k.error").write_text("data.datasets[0] row 3: bad; fix it")
    with pytest.raises(ValueError, match="row 3: bad"):
        cache._wait(tmp_path / "k", tmp_path / "k.error", tmp_path / "k.building", timeout_s=5)
    beat = tmp_path / "j.building"
    beat.touch()
    os.utime(beat, (time.time() - 60, time.time() - 60))
    with pytest.raises(ValueError, match="rank 0 has not worked on the data cache"):
        cache._wait(tmp_path / "j", tmp_path / "j.error", beat, timeout_s=30)


def test_a_failed_build_leaves_no_cache_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": ,}\n')  # datasets fails to read it
    (tmp_path / "num.jsonl").write_text('{"text": "a"}\n{"text": 7}\n')  # read, then refused row by row
    for name in ("bad.jsonl", "num.jsonl"):
        with pytest.raises(ValueError, match=name):
            splits_of(tmp_path, {"datasets": entries(tmp_path / name, "text"), "val_set_size": 1})
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    s = splits_of(tmp_path, {"datasets": entries(DATA / "text.jsonl", "text"), "val_set_size": 1})
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(s.stats["cache"]).name]  # datasets' files gone


def test_rank0_error_file_goes_once_every_rank_has_read_it(tmp_path, monkeypatch):
    import torch.distributed as dist

    from spra_dist.data import cache

    rank, seen = 0, []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: rank)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: seen.append(sorted(p.name for p in tmp_path.iterdir())))

    def build(*scratch):
        raise ValueError("data.datasets[0] row 3 (1-based): bad; fix it")

    with pytest.raises(ValueError, match=r"row 3 \(1-based\): bad"):
        cache.prepared(tmp_path, "k", build, timeout_s=5)
    assert seen == [[], ["k.error"]]  # the waiting ranks join the second barrier once they have read the file
    assert list(tmp_path.iterdir()) == []
    rank, seen = 1, []
    (tmp_path / "k.error").write_text("data.datasets[0] row 3 (1-based): bad; fix it")
    with pytest.raises(ValueError, match=r"row 3 \(1-based\): bad"):
        cache._wait(tmp_path / "k", tmp_path / "k.error", tmp_path / "k.building", timeout_s=5)
    assert seen == [["k.error"]]


def test_bundled_sources_keep_their_tokens():
    cfg = load_config(None, ["data.max_length=16", "data.train_size=4", "data.eval_size=2"])
    s = build_data(cfg.data, task="causal_lm", codec=ByteCodec())
    ex = s.train.example(0)
    assert len(ex["input_ids"]) == 16 and ex["input_ids"][0] == BYTE_BOS and ex["labels"][1:] == ex["input_ids"][1:]
    cfg = load_config(None, ["model.source=tiny_bert", "task=classification", "data.train_size=4"])
    s = build_data(cfg.data, task="classification", codec=ByteCodec())
    assert s.train.classification and len(s.train) == 4


def test_macro_f1():
    from spra_dist.train.eval import macro_f1

    assert macro_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # class 0: tp 2, fp 1, fn 0 -> 0.8; class 1: tp 1, fp 0, fn 1 -> 2/3
    assert abs(macro_f1([0, 0, 0, 1], [0, 0, 1, 1]) - (0.8 + 2 / 3) / 2) < 1e-12


def test_dataset_entries_from_yaml_and_overrides(tmp_path):
    cfg = load_config(None, ["data.datasets=[{path: a.jsonl, type: chat, roles_to_train: [assistant, user]}]",
                             "sequence_len=256"])
    assert cfg.data.datasets[0].roles_to_train == ["assistant", "user"] and cfg.data.max_length == 256
    assert cfg.data.source == "datasets"
    with pytest.raises(ValueError, match="unknown key data.datasets\\[0\\].pth; did you mean 'path'"):
        load_config(None, ["data.datasets=[{pth: a.jsonl}]"])


@pytest.mark.slow
def test_dataset_processes_give_the_same_tokens(tmp_path):
    rows = [{"prompt": f"q{i}:", "completion": " a" * (i % 7 + 1)} for i in range(40)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"datasets": entries(tmp_path / "rows.jsonl", "completion"), "val_set_size": 4}
    one = splits_of(tmp_path, data)
    two = splits_of(tmp_path, {**data, "dataset_processes": 2, "dataset_prepared_path": str(tmp_path / "c2")})
    assert one.stats["cache"] != two.stats["cache"]
    assert one.train.ds["input_ids"] == two.train.ds["input_ids"] and one.train.ds["labels"] == two.train.ds["labels"]


@pytest.mark.slow
def test_classification_label_names_reach_the_adapter_and_summary(tmp_path):
    from spra_dist.train.recipe import train

    entry = entries(DATA / "labels.csv", "classification", column_map={"text": "review", "label": "sentiment"})
    cfg = config(tmp_path, {"datasets": entry, "eval_datasets": entry}, task="classification",
                 max_steps=1, batch_size=3, output_dir=str(tmp_path / "run"),
                 spra={"target_modules": "all-linear", "lora_rank": 2, "trainable_modules": ["classifier"]})
    cfg.model.source = "tiny_bert"
    summary = train(cfg)
    assert summary["label_names"] == ["bad", "good"]
    assert {"accuracy_after", "macro_f1_after"} <= set(summary)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["label_names"] == ["bad", "good"]


def test_val_set_size_keeps_duplicates_on_one_side(tmp_path):
    rows = [{"text": f"row {i % 10}"} for i in range(60)]  # every text six times
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = splits_of(tmp_path, {"datasets": entries(tmp_path / "dup.jsonl", "text"), "val_set_size": 0.3})
    train = {bytes(s.train.example(i)["input_ids"][1:-1]).decode() for i in range(len(s.train))}
    evals = {bytes(s.eval.example(i)["input_ids"][1:-1]).decode() for i in range(len(s.eval))}
    assert train and evals and not train & evals and len(s.eval) % 6 == 0


def test_packing_is_refused_where_attention_mixes_documents():
    import transformers as tf

    from spra_dist.data.packing import check_packing

    check_packing(build_model(load_config(None).model, seed=0).model)  # tiny Llama keeps documents apart
    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                         num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match="OPTForCausalLM .* lets packed documents attend to each other.*"
                                         "sample_packing=false"):
        check_packing(opt)
