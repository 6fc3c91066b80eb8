"""Bad data: each case ends `spra preprocess` (and so `spra train`) with one `error: ...` line naming the
file, column or row and the fix, exit status 2."""

import json
from pathlib import Path

import pytest
import yaml

from spra_dist.cli import main

DATA = Path(__file__).parent / "data"


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cases(tmp: Path):
    chat_ok = jsonl(tmp / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]}])
    labels = tmp / "labels.csv"
    labels.write_text("text,label\na,0\nb,1\nc,0\n")
    wide = tmp / "wide.csv"
    wide.write_text("text,label\na,0\nb,5\n")
    named = tmp / "named.csv"
    named.write_text("text,label\na,good\nb,bad\n")
    unseen = tmp / "unseen.csv"
    unseen.write_text("text,label\na,good\nb,meh\n")
    (tmp / "empty.jsonl").write_text("")
    broken_jsonl, broken_json = tmp / "broken.jsonl", tmp / "broken.json"
    broken_jsonl.write_text('{"text": "a"}\n\n{"text": "b",}\n{"text": "c"}\n')  # line 3, after a blank line
    broken_json.write_text('[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]\n')
    (tmp / "data.xlsx").write_text("x")
    return [
        ("missing file", {"datasets": [{"path": str(tmp / "nope.jsonl"), "type": "text"}]},
         ["data.datasets[0].path=", "nope.jsonl' does not exist", "give a file, glob or directory"]),
        ("glob without a match", {"datasets": [{"path": str(tmp / "*.parquet"), "type": "text"}]},
         ["matches no file"]),
        ("unknown extension", {"datasets": [{"path": str(tmp / "data.xlsx"), "type": "text"}]},
         ["cannot read .xlsx files"]),
        ("missing column", {"datasets": [{"path": str(DATA / "text.jsonl"), "type": "completion"}],
                            "val_set_size": 1},
         ["text.jsonl", "type completion", "no column 'prompt', 'completion'", "its columns are text;",
          "column_map"]),
        ("column_map names a missing column",
         {"datasets": [{"path": str(DATA / "text.jsonl"), "type": "text", "column_map": {"text": "body"}}]},
         ["column_map names column 'body'", "its columns are text"]),
        ("empty split", {"datasets": [{"path": str(DATA / "text.jsonl"), "type": "text", "split": "train[3:]"}]},
         ["split 'train[3:]'", "is empty"]),
        ("empty file", {"datasets": [{"path": str(tmp / "empty.jsonl"), "type": "text"}]},
         ["empty.jsonl"]),
        ("unknown split", {"datasets": [{"path": str(DATA / "text.jsonl"), "type": "text", "split": "test"}]},
         ["split='test'", "files give one split, train"]),
        ("non-string text", {"datasets": [{"path": jsonl(tmp / "num.jsonl", [{"text": "ok"}, {"text": 7}]),
                                           "type": "text"}], "val_set_size": 1},
         ["num.jsonl", "row 2 (1-based)", "column 'text' holds int 7", "make every text a string"]),
        ("unknown role", {"datasets": [{"path": str(DATA / "sharegpt.json"), "type": "chat",
                                        "column_map": {"messages": "conversations", "role": "from",
                                                       "content": "value"}}], "chat_template": "chatml",
                          "max_length": 256, "val_set_size": 1},
         ["sharegpt.json", "row 2 (1-based)", "message 2 of 2 has unknown role 'bot_reply'",
          "roles: {assistant: [bot_reply]}"]),
        ("no chat template", {"datasets": [{"path": chat_ok, "type": "chat"}]},
         ["type chat needs a chat template", "data.chat_template=chatml"]),
        ("template file missing", {"datasets": [{"path": chat_ok, "type": "chat"}],
                                   "chat_template": str(tmp / "t.jinja")},
         ["chat_template=", "t.jinja' is neither chatml nor an existing Jinja file"]),
        ("all over length, error", {"datasets": [{"path": str(DATA / "completion.jsonl"), "type": "completion"}],
                                    "max_length": 8, "excess_length": "error", "val_set_size": 1},
         ["completion.jsonl", " (1-based): ", "tokens exceed data.max_length=8", "excess_length=drop or truncate"]),
        ("all dropped", {"datasets": [{"path": str(DATA / "completion.jsonl"), "type": "completion"}],
                         "max_length": 8, "val_set_size": 1},
         ["every one of the 2 train examples was dropped (2 over data.max_length=8"]),
        ("nothing trained", {"datasets": [{"path": chat_ok, "type": "chat", "roles_to_train": ["system"]}],
                             "chat_template": "chatml", "eval_datasets": [{"path": chat_ok, "type": "chat"}],
                             "max_length": 256},
         ["every one of the 1 train examples was dropped", "1 with no trained token", "roles_to_train"]),
        ("label out of range", {"datasets": [{"path": str(wide), "type": "classification"}], "val_set_size": 1},
         ["wide.csv", "row 2 (1-based)", "label 5 is out of range for model.num_labels=2"], "classification"),
        ("label unseen in eval", {"datasets": [{"path": str(named), "type": "classification"}],
                                  "eval_datasets": [{"path": str(unseen), "type": "classification"}]},
         ["data.eval_datasets[0]", "unseen.csv", "row 2 (1-based)", "label 'meh' is not a class of the training data"],
         "classification"),
        ("more classes than num_labels", {"datasets": [{"path": str(unseen), "type": "classification"}],
                                          "eval_datasets": [{"path": str(named), "type": "classification"}],
                                          "labels": ["good", "meh", "bad"]},
         ["the training data has 3 classes", "set model.num_labels=3"], "classification"),
        ("val_set_size with eval_datasets", {"datasets": [{"path": str(labels), "type": "text"}], "val_set_size": 0.1,
                                             "eval_datasets": [{"path": str(labels), "type": "text"}]},
         ["data.val_set_size and data.eval_datasets are exclusive"]),
        ("type against task", {"datasets": [{"path": str(labels), "type": "classification"}]},
         ["data.datasets[0].type=classification does not fit model.task=causal_lm"]),
        ("unknown type", {"datasets": [{"path": str(labels), "type": "sharegpt"}]},
         ["data.datasets[0].type='sharegpt' is not one of text, completion, alpaca, chat, classification"]),
        ("val_set_size too big", {"datasets": [{"path": str(DATA / "text.jsonl"), "type": "text"}],
                                  "val_set_size": 3}, ["data.val_set_size=3 leaves no training rows"]),
        ("malformed JSONL", {"datasets": [{"path": str(broken_jsonl), "type": "text"}]},
         [f"data.datasets[0]: {str(broken_jsonl)!r} line 3 is not valid JSON (Expecting property name",
          "fix or remove that line"]),
        ("malformed JSON array", {"datasets": [{"path": str(broken_json), "type": "text"}]},
         [f"data.datasets[0]: {str(broken_json)!r} line 3 is not valid JSON (Expecting ',' delimiter"]),
        ("bad slice", {"datasets": [{"path": str(DATA / "text.jsonl"), "type": "text", "split": "train[:x]"}]},
         ["split='train[:x]' is not a valid slice", "train[:90%]"]),
    ]


@pytest.mark.filterwarnings("ignore:the chat template ends a turn")
def test_bad_data_cases(tmp_path, capsys):
    failures = []
    for case in cases(tmp_path):
        name, data, fragments = case[:3]
        task = case[3] if len(case) > 3 else "causal_lm"
        cfg = {"model": {"source": "tiny_bert" if task == "classification" else "tiny_llama", "task": task},
               "data": {"dataset_prepared_path": str(tmp_path / "cache"), **data}}
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code = main(["preprocess", "--config", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        lines = [line for line in err if line.startswith("error:")]
        if (code != 2 or len(lines) != 1 or not all(f in lines[0] for f in fragments)
                or "__" in lines[0]):  # no internal column (__row__) in a message
            failures.append(f"{name}: exit {code}, {lines or err[-3:]}")
    assert not failures, "\n".join(failures)


def test_preprocess_shows_trained_tokens(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": "tiny_llama"},
        "data": {"datasets": [{"path": str(DATA / "completion.jsonl"), "type": "completion"}], "max_length": 30,
                 "val_set_size": 1, "dataset_prepared_path": str(tmp_path / "cache")}}))
    assert main(["preprocess", "--config", str(path), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 1 examples kept of 2; dropped 1 over max_length=30, 0 with no trained token" in out
    assert "--- example 0:" in out and "cache:" in out
    marks = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert "+" in marks
    body = [line for line in out.splitlines() if line.startswith("  ")]
    assert body[-1].startswith("  +") and "</s>" in body[-1]  # EOS closes the answer, trained
