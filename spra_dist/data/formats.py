"""One builder per data type: a batch of rows -> token ids and per-token labels (-100: not trained).

    out = BUILDERS["completion"](batch, prep)   # {input_ids, labels, n_trained, length, status}

Every builder marks the trained text by character ranges and tokenises the whole example once, so the ids are
exactly what the model sees at inference; a token is trained when its span overlaps a trained range. An
answer ends with the tokenizer's EOS, trained, so the model learns to stop. ``status`` says what happens to the
row: KEEP, LONG (over max_length, dropped) or UNTRAINED (no trained token left, dropped and counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spra_dist.data.codec import Codec

KEEP, LONG, UNTRAINED = 0, 1, 2
IGNORE = -100

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

COLUMNS = {"text": ["text"], "completion": ["prompt", "completion"], "alpaca": ["instruction", "output"],
           "chat": ["messages"], "classification": ["text", "label"]}


@dataclass
class Prep:
    """What a builder needs besides the rows; plain data, so it pickles into dataset_processes workers."""

    codec: Codec
    max_length: int
    excess_length: str
    where: str
    """The entry and its path, for error messages: data.datasets[0] ('data/train.jsonl')."""
    train_on_inputs: bool = False
    template: str | None = None
    roles: dict[str, str] = field(default_factory=dict)
    """Chat: a role name in the data -> ours."""
    roles_to_train: tuple[str, ...] = ("assistant",)
    role_key: str = "role"
    content_key: str = "content"
    label2id: dict | None = None
    """Classification: string label -> id (None: labels are ids already)."""
    num_labels: int = 2


def bad_row(prep: Prep, row: int, problem: str, fix: str) -> ValueError:
    """The error for the entry's row ``row`` (0-based index; the message counts from 1, as editors do)."""
    return ValueError(f"{prep.where} row {row + 1} (1-based): {problem}; {fix}")


def check_text(prep: Prep, row: int, column: str, value, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise bad_row(prep, row, f"column {column!r} holds {type(value).__name__} {value!r:.60}, not a string",
                      f"make every {column} a string (quote numbers in CSV/JSON) or drop the row")
    return value


def mark(codec: Codec, items: list[tuple[str, list[tuple[int, int]]]], *, special: bool,
         eos: bool) -> list[tuple[list[int], list[int]]]:
    """Tokenise each (text, trained ranges) once, the batch in one call; label the tokens overlapping a trained
    character range (tokens without text, such as BOS, never), then append a trained EOS if asked."""
    out = []
    encoded = codec.encode_offsets([text for text, _ in items], special=special)
    for (text, trained), (ids, spans) in zip(items, encoded, strict=True):
        if trained == [(0, len(text))]:  # all of it (text, train_on_inputs)
            labels = [i if e > s else IGNORE for i, (s, e) in zip(ids, spans, strict=True)]
        else:
            labels = [i if e > s and any(s < e_r and e > s_r for s_r, e_r in trained) else IGNORE
                      for i, (s, e) in zip(ids, spans, strict=True)]
        if eos:
            ids, labels = ids + [codec.eos_id], labels + [codec.eos_id]
        out.append((ids, labels))
    return out


def too_long(prep: Prep, row: int, n_tokens: int) -> ValueError:
    """The error for an example over data.max_length under excess_length=error."""
    return bad_row(prep, row, f"{n_tokens} tokens exceed data.max_length={prep.max_length}",
                   "raise data.max_length (sequence_len) or set data.excess_length=drop or truncate")


def finish(prep: Prep, row: int, ids: list[int], labels: list[int]) -> tuple[list[int], list[int], int]:
    """Apply excess_length; the status says whether the row is kept."""
    if len(ids) > prep.max_length:
        match prep.excess_length:
            case "error":
                raise too_long(prep, row, len(ids))
            case "drop":
                return ids, labels, LONG
            case _:
                ids, labels = ids[: prep.max_length], labels[: prep.max_length]
    trained = sum(1 for lab in labels[1:] if lab != IGNORE)
    return ids, labels, KEEP if trained else UNTRAINED


def _collect(rows) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_trained": [], "length": [], "status": []}
    for ids, labels, status in rows:
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_trained"].append(sum(1 for lab in labels[1:] if lab != IGNORE))
        out["length"].append(len(ids))
        out["status"].append(status)
    return out


def build_text(batch: dict, prep: Prep) -> dict[str, list]:
    """Causal LM on raw text: every token trained, BOS (if the tokenizer adds one) + text + EOS."""
    texts = [check_text(prep, row, "text", t) for row, t in zip(batch["__row__"], batch["text"], strict=True)]
    marked = mark(prep.codec, [(t, [(0, len(t))]) for t in texts], special=True, eos=True)
    return _collect(finish(prep, row, ids, labels) for row, (ids, labels) in zip(batch["__row__"], marked,
                                                                                 strict=True))


def _prompted(prep: Prep, rows: list[int], pairs: list[tuple[str, str]]) -> dict[str, list]:
    """prompt + answer per row; the answer (or, with train_on_inputs, all of it) trained, then EOS."""
    items = []
    for prompt, answer in pairs:
        text = prompt + answer
        items.append((text, [(0, len(text))] if prep.train_on_inputs else [(len(prompt), len(text))]))
    marked = mark(prep.codec, items, special=True, eos=True)
    return _collect(finish(prep, row, ids, labels) for row, (ids, labels) in zip(rows, marked, strict=True))


def build_completion(batch: dict, prep: Prep) -> dict[str, list]:
    """prompt + completion (joined as written: put any separator in the data); loss on the completion."""
    pairs = [(check_text(prep, row, "prompt", p), check_text(prep, row, "completion", c))
             for row, p, c in zip(batch["__row__"], batch["prompt"], batch["completion"], strict=True)]
    return _prompted(prep, batch["__row__"], pairs)


def build_alpaca(batch: dict, prep: Prep) -> dict[str, list]:
    """The Alpaca prompt around instruction (+ input); loss on output."""
    pairs = []
    inputs = batch.get("input") or [None] * len(batch["__row__"])
    for row, instruction, extra, output in zip(batch["__row__"], batch["instruction"], inputs, batch["output"],
                                               strict=True):
        instruction = check_text(prep, row, "instruction", instruction)
        extra = check_text(prep, row, "input", extra, optional=True)
        prompt = (ALPACA_INPUT if extra.strip() else ALPACA).format(instruction=instruction, input=extra)
        pairs.append((prompt, check_text(prep, row, "output", output)))
    return _prompted(prep, batch["__row__"], pairs)


def build_classification(batch: dict, prep: Prep) -> dict[str, list]:
    """text (+ text_pair) with the model's special tokens; label as a class id."""
    out: dict[str, list] = {"input_ids": [], "label": [], "length": [], "status": []}
    pairs = batch.get("text_pair") or [None] * len(batch["__row__"])
    for row, text, pair, label in zip(batch["__row__"], batch["text"], pairs, batch["label"], strict=True):
        text = check_text(prep, row, "text", text)
        pair = None if pair is None else check_text(prep, row, "text_pair", pair)
        ids = prep.codec.encode_pair(text, pair, None)
        status = KEEP
        if len(ids) > prep.max_length:
            match prep.excess_length:
                case "error":
                    raise too_long(prep, row, len(ids))
                case "drop":
                    status = LONG
                case _:
                    ids = prep.codec.encode_pair(text, pair, prep.max_length)
        out["input_ids"].append(ids)
        out["label"].append(class_id(prep, row, label))
        out["length"].append(len(ids))
        out["status"].append(status)
    return out


def class_id(prep: Prep, row: int, label) -> int:
    if prep.label2id is not None:
        if label not in prep.label2id:
            raise bad_row(prep, row, f"label {label!r} is not a class of the training data "
                          f"({', '.join(map(str, prep.label2id))})",
                          "fix the row, or list every class in data.labels")
        return prep.label2id[label]
    if isinstance(label, bool) or not isinstance(label, int):
        raise bad_row(prep, row, f"label {label!r} is a {type(label).__name__}",
                      "use class ids 0..num_labels-1 or class names (strings) in every row")
    if not 0 <= label < prep.num_labels:
        raise bad_row(prep, row, f"label {label} is out of range for model.num_labels={prep.num_labels}",
                      f"use ids 0..{prep.num_labels - 1} or set model.num_labels to the number of classes")
    return label


def build_blocks(batch: dict, prep: Prep) -> dict[str, list]:
    """Rows that are token blocks already (the bundled text_file source): every token trained."""
    return _collect((ids, list(ids), KEEP) for ids in batch["input_ids"])
