"""A dataclass from a nested mapping (a YAML file's), typed and checked by pydantic, with errors a user can act on.

    cfg = typed(TrainConfig, {"max_steps": 5, "spra": {"lora_rank": 4}})

pydantic checks each value against its field's type hint (``Literal`` choices, ``PositiveInt`` and ``Field`` bounds,
nested dataclasses and lists of them) in its lax mode, less the conversions a YAML value does not mean
(``_CONVERSIONS``). Its first error becomes one ``ValueError`` that names the dotted key (``data.datasets[0].type``),
the value and what the field takes: ``max_steps='many' has the wrong type; expected int``, ``engine='tpu' is not one
of auto, none, ddp, fsdp2, deepspeed``, ``max_steps=0 must be a positive integer``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")


def typed(cls: type[T], raw: dict[str, Any]) -> T:
    """``cls`` built from ``raw``, each value checked against its field's type (keys left out keep their
    defaults); ValueError naming the first bad key, its value and what the field takes."""
    try:
        out = _adapter(cls).validate_python(raw)
    except ValidationError as err:
        raise ValueError(_message(cls, err.errors())) from None
    _refuse_conversions(raw, out, "")
    return out


@functools.cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


# pydantic's lax mode converts more than a YAML value means (True -> 1, "5" -> 5, 1 or "yes" -> True). These are
# the conversions a value may take, as (its type, the field's type): an integral float for an int (5.0), an int or
# a numeric string for a float (YAML 1.1 reads 3e-4 as a string), a boolean for a string (where the field turns
# YAML's no into the word, as mixed_precision does). pydantic has refused the rest already, or this refuses them.
_CONVERSIONS = {(float, int), (int, float), (str, float), (bool, str)}


def _refuse_conversions(raw: Any, out: Any, key: str) -> None:
    """Walk the input beside pydantic's output; a scalar whose type changed other than by _CONVERSIONS is refused."""
    if isinstance(raw, dict):
        for name, value in raw.items():
            item = getattr(out, name) if dataclasses.is_dataclass(out) else out[name]
            _refuse_conversions(value, item, f"{key}.{name}" if key else str(name))
    elif isinstance(raw, (list, tuple)):
        for i, (value, item) in enumerate(zip(raw, out, strict=True)):
            _refuse_conversions(value, item, f"{key}[{i}]" if dataclasses.is_dataclass(item) else key)
    elif raw is not None and type(raw) is not type(out) and (type(raw), type(out)) not in _CONVERSIONS:
        raise ValueError(_wrong_type(key, raw, type(out).__name__))


def _message(cls: type, errors: list[Any]) -> str:
    """One line for pydantic's first error: the dotted key, the value, and what the field takes."""
    err = errors[0]
    key, hint, inner = _field(cls, err["loc"])
    value, kind = err["input"], err["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        names = [f.name for f in dataclasses.fields(hint)]
        near = difflib.get_close_matches(str(inner[0]), names, n=1)
        hint_text = f"did you mean {near[0]!r}?" if near else f"use {', '.join(names)}"
        return f"unknown key {key}{'.' if key else ''}{inner[0]}; {hint_text}"
    if len(_options(hint)) > 1:  # str | list[str]: pydantic tried each option; name the whole value
        at = err["loc"][:len(err["loc"]) - len(inner)]
        whole = min((e for e in errors if e["loc"][:len(at)] == at), key=lambda e: len(e["loc"]))["input"]
        return _wrong_type(key, whole, _type_name(hint))
    expected = _type_at(hint, inner)
    named = inner[:-2] if inner[-1:] == ("[key]",) else inner  # a mapping's key goes by the mapping's name,
    key += "".join(f".{part}" for part in named if isinstance(part, str))  # a list's item by the list's
    ctx = err.get("ctx", {})
    bound = kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
    if bound and type(value) is not expected and (type(value), expected) not in _CONVERSIONS:
        return _wrong_type(key, value, expected.__name__)  # pydantic converted True to 1, then checked the bound
    match kind:
        case "literal_error" if isinstance(value, str):
            return f"{key}={value!r} is not one of {', '.join(_choices(hint))}"
        case "literal_error":
            return _wrong_type(key, value, "str")
        case "dataclass_type" | "dataclass_exact_type":
            return _wrong_type(key, value, f"a mapping of {expected.__name__} fields")
        case "greater_than" if expected is int and ctx.get("gt") == 0:
            return f"{key}={value!r} must be a positive integer"
        case "greater_than_equal" if ctx.get("ge") == 0:
            return f"{key}={value!r} is negative; use 0 or more"
        case _ if bound:
            return f"{key}={value!r} must lie in {_interval(hint)}"
        case _ if kind.endswith(("_type", "_parsing", "_from_float")):
            return _wrong_type(key, value, _type_name(expected))
    return f"{key}={value!r}: {err['msg']}"


def _field(cls: type, loc: tuple[Any, ...]) -> tuple[str, Any, tuple[Any, ...]]:
    """The dotted key of the field at pydantic's error location (``data.datasets[0].type``), its type hint, and
    the location inside that field (a list index, a mapping key, a union member)."""
    hint: Any = cls
    key, i = "", 0
    while i < len(loc) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint, include_extras=True)
        if loc[i] not in hints:  # an unknown key: stop at the dataclass that lacks it
            break
        hint, key, i = hints[loc[i]], f"{key}.{loc[i]}" if key else loc[i], i + 1
        item = get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(item) and i < len(loc) and isinstance(loc[i], int):
            hint, key, i = item, f"{key}[{loc[i]}]", i + 1
    return key, hint, tuple(loc[i:])


def _type_at(hint: Any, inner: tuple[Any, ...]) -> Any:
    """The type at a location inside a field: str at (0,) in list[str], list[str] at ('user',) in
    dict[Role, list[str]], Role at ('bot', '[key]')."""
    for i, part in enumerate(inner):
        if part == "[key]":
            continue
        args = get_args(_bare(_options(hint)[0]))
        hint = args[0] if len(args) == 1 or inner[i + 1:i + 2] == ("[key]",) else args[-1]
    return _bare(_options(hint)[0])


def _type_name(tp: Any) -> str:
    """int, list[str], list[DatasetEntry]: as written in the schema, without module paths; a choice is a str (a
    value that is not one of its options gets its own message)."""
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    return re.sub(r"\b[\w.]+\.(?=\w)", "", re.sub(r"(typing\.)?Literal\[[^\]]*\]", "str", str(tp)))


def _bare(hint: Any) -> Any:
    """The type without its Annotated metadata (PositiveInt -> int)."""
    return get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def _options(hint: Any) -> tuple[Any, ...]:
    """The types a field takes besides None: (PositiveInt,) for ``PositiveInt | None``, (str, list[str]) for
    ``str | list[str]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in get_args(hint) if a is not type(None))
    return (hint,)


def _choices(hint: Any) -> tuple[str, ...]:
    """The options of the Literal inside a field's type (Role in ``dict[Role, list[str]]``)."""
    if typing.get_origin(hint) is Literal:
        return get_args(hint)
    return next((found for arg in get_args(hint) if (found := _choices(arg))), ())


def _interval(hint: Any) -> str:
    """'(0, 1)' for ``Annotated[float, Field(gt=0, lt=1)]``."""
    bounds = {name: getattr(m, name) for info in getattr(_options(hint)[0], "__metadata__", ())
              for m in getattr(info, "metadata", [info]) for name in ("gt", "ge", "lt", "le") if hasattr(m, name)}
    low = f"({bounds['gt']}" if "gt" in bounds else f"[{bounds.get('ge', '-inf')}"
    high = f"{bounds['lt']})" if "lt" in bounds else f"{bounds.get('le', 'inf')}]"
    return f"{low}, {high}"


def _wrong_type(key: str, value: Any, expected: str) -> str:
    return f"{key}={value!r} has the wrong type; expected {expected}"
