"""The config reference: every key of a training config with its default and description, from the dataclasses.

    spra config                              # one line per key (also at the end of spra train --help)
    spra config --markdown > docs/config.md  # the same reference as a page (a test keeps the page current)

The descriptions are the docstrings under the fields of ``TrainConfig``, ``ModelConfig``, ``DataConfig``,
``DatasetEntry`` and ``SpraConfig``, read from their source; what a field takes comes from its type hint.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import yaml

from spra_dist.data.config import DatasetEntry
from spra_dist.train.schema import TrainConfig

__all__ = ["Key", "config_keys", "field_docs", "markdown", "text"]


@dataclass(frozen=True)
class Key:
    key: str
    """Dotted, as an override writes it: ``lr``, ``model.source``, ``data.datasets[].type`` (an entry's field)."""

    default: str
    """The default as YAML writes it: ``100``, ``null``, ``[assistant]``."""

    takes: str
    """What the field accepts: ``int > 0``, ``cosine | linear | constant``, ``str or null``."""

    doc: str
    """The field's docstring as one paragraph."""

    @property
    def summary(self) -> str:
        """The description's first sentence."""
        return re.split(r"(?<=[\w)\]`'])\.\s+(?=[A-Z(])", self.doc, maxsplit=1)[0].rstrip(".") + "."


def config_keys() -> list[Key]:
    """Every key, in the order of the dataclasses: top-level fields, then model, data, data.datasets entries, spra."""
    keys = []
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(f.default_factory):
            keys += _keys(f.default_factory, f"{f.name}.")
            if f.name == "data":
                keys += _keys(DatasetEntry, "data.datasets[].")
        else:
            keys.append(_key(TrainConfig, f, ""))
    return keys


def _keys(cls: type, prefix: str) -> list[Key]:
    return [_key(cls, f, prefix) for f in dataclasses.fields(cls)]


def _key(cls: type, f: dataclasses.Field, prefix: str) -> Key:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    hint = typing.get_type_hints(cls, include_extras=True)[f.name]
    return Key(f"{prefix}{f.name}", _yaml(default), _takes(hint), field_docs(cls).get(f.name, ""))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring as one paragraph} for a dataclass whose fields each carry a string under them."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split()).replace("``", "`")
    return docs


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _takes(hint: Any) -> str:
    """A type hint in words: ``int > 0``, ``no | bf16 | auto``, ``float in (0, 1)``, ``list of str``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        words = " or ".join(_takes(a) for a in options)
        return f"{words} or null" if len(options) < len(get_args(hint)) else words
    if typing.get_origin(hint) is Annotated:
        base, *meta = get_args(hint)
        bounds = {name: getattr(m, name) for info in meta for m in getattr(info, "metadata", [info])
                  for name in ("gt", "ge", "lt", "le") if getattr(m, name, None) is not None}
        return _takes(base) + _bounds(bounds)
    if typing.get_origin(hint) is Literal:
        return " | ".join(str(a) for a in get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {_takes(get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        key, value = get_args(hint)
        return f"mapping of {_takes(key)} to {_takes(value)}"
    if dataclasses.is_dataclass(hint):
        return f"{hint.__name__} entry"
    return getattr(hint, "__name__", str(hint))


def _bounds(bounds: dict[str, Any]) -> str:
    match bounds:
        case {"gt": low, "lt": high}:
            return f" in ({low}, {high})"
        case {"gt": low}:
            return f" > {low}"
        case {"ge": low}:
            return f" >= {low}"
    return ""


def text(*, width: int = 110) -> str:
    """The keys for a terminal: ``key=default``, then the first sentence of its description."""
    column = 34
    lines = ["config keys (YAML, or key=value overrides; the full reference: docs/config.md or "
             "spra config --markdown):"]
    for k in config_keys():
        head = f"  {k.key}={k.default}"
        body = textwrap.wrap(k.summary, width=width - column)
        if len(head) > column - 2:
            lines.append(head)
        else:
            lines.append(f"{head:<{column}}{body.pop(0)}")
        lines += [" " * column + line for line in body]
    return "\n".join(lines) + "\n"


INTRO = """\
# Config reference

<!-- Generated from the config dataclasses: spra config --markdown > docs/config.md (a test checks it is current).
Edit the field docstrings in spra_dist/train/schema.py, spra_dist/data/config.py or spra_dist/core/config.py. -->

Every key of a training config, with its default and what it does. A run is a YAML file plus `key=value`
overrides ([training.md](training.md)); in YAML the keys of a section nest under it (`model:`, `data:`, `spra:`),
an override writes them dotted (`spra.lora_rank=4`) or bare when the name is unique (`lora_rank=4`). The same list
is printed by `spra config` and at the end of `spra train --help`. An unknown key names the nearest valid one, also
for the names other tools use (`learning_rate`, `num_train_epochs`, `max_seq_len`, `sequence_len`).

**Checkpointing is off by default** (`checkpoint_every: 0`): a run that stops before its end (a preemption, a lost
rank, a crash) has nothing to continue from: run again, it starts over from step 0. Set `checkpoint_every` to write
resume checkpoints (O(k) each) into `output_dir/checkpoints`; `resume=auto` then continues from the newest.

## Your own model
`model.source: hf` trains any transformers model: `model.name_or_path` names a directory written by
`save_pretrained` (config.json, safetensors weights, tokenizer files) or a hub id. `task` picks the head
(`causal_lm`, or `classification` with `num_labels`); the `hidden_size` ... `max_position_embeddings` keys are
for the tiny random models only. The real-size examples `configs/train/llama3_8b_sft_fsdp2.yaml` and
`configs/train/llama3_70b_sft_zero3.yaml` open with the line that launches them.
```yaml
model:
  source: hf
  name_or_path: meta-llama/Meta-Llama-3-8B-Instruct   # or /models/Meta-Llama-3-8B-Instruct
  task: causal_lm
  dtype: bfloat16
```

## Checking a config: `spra train --dry-run`
`--dry-run` builds the model on the meta device (no weights read, no memory taken), selects the matrices SpaRA
adapts and prints the plan: `k` per kind of matrix and in total, the trainable fraction, the engine and world size,
the steps and the batch. It writes nothing. It reads only the model's `config.json`: a directory that holds just
that file is enough, so a config for a model you have not downloaded can be checked (`--world-size N` plans for a
launch of N processes).
```bash
spra train --config configs/train/debug_tiny_llama.yaml --dry-run
```
<!-- not run: needs network access (the dry run reads the model's config.json from the hub) -->
```bash
spra train --config configs/train/llama3_70b_sft_zero3.yaml --dry-run --world-size 8
```
"""

SECTIONS = (
    ("", "Training", "The top level of a config: the run, the optimizer and schedule, the engine, checkpoints."),
    ("model.", "model", "The base model."),
    ("data.", "data", "The data set ([data.md](data.md))."),
    ("data.datasets[].", "data.datasets and data.eval_datasets entries",
     "Each entry of `data.datasets` (and of `data.eval_datasets`) takes these keys."),
    ("spra.", "spra", "Which matrices are adapted and how many entries each trains."),
)


def markdown() -> str:
    """docs/config.md: the introduction, then one table per section."""
    keys = config_keys()
    out = [INTRO]
    for prefix, title, about in SECTIONS:
        rows = [k for k in keys if _section(k.key) == prefix]
        out += [f"## {title}", about, "", "| key | default | takes | description |", "|---|---|---|---|"]
        out += [f"| `{k.key}` | `{k.default}` | {_cell(k.takes)} | {_cell(k.doc)} |" for k in rows]
        out.append("")
    return "\n".join(out)


def _section(key: str) -> str:
    return max((p for p, _, _ in SECTIONS if key.startswith(p)), key=len)


def _cell(text_: str) -> str:
    return text_.replace("|", "\\|").replace("<", "&lt;")


if __name__ == "__main__":
    print(markdown(), end="")
