"""The package's shape: no import cycle between its modules, state on a model only through its one owner, the
public API and the old import paths unchanged."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import spra_dist
from spra_dist import _compat

PACKAGE = Path(spra_dist.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (module level, functions, branches)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    assert sum(map(len, graph.values())) > 100  # the walk sees the package's imports
    assert "spra_dist.distributed.agreement" in graph["spra_dist.core.model"]  # function-level and from-imports too
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_registry_keeps_state_on_a_model():
    """No module hands state to another through attributes written into a model: one owner, core/registry.py."""
    writers = []
    for name, path in modules().items():
        source = path.read_text()
        assigned = [t for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign | ast.AugAssign)
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
        # model.spra_x = ... (not model.config.x = ... or model.generation_config = ..., the model's own configs)
        on_model = [t for t in assigned if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                    and "model" in t.value.id and t.attr != "generation_config"]
        if "__dict__" in source or on_model:
            writers.append(name)
    assert writers == ["spra_dist.core.registry"]


def test_public_api_is_unchanged():
    assert sorted(spra_dist.__all__) == [
        "MASK_VERSION", "SpraConfig", "SpraLinear", "active_adapter", "apply_spra", "combine_adapters",
        "delete_adapter", "disable_adapter", "list_adapters", "load_adapter", "merge_adapter", "quantize_targets",
        "sample_indices", "save_adapter", "set_adapter", "spra_modules", "trainable_parameters"]
    assert all(hasattr(spra_dist, name) for name in spra_dist.__all__)


@pytest.mark.slow
def test_old_import_paths_still_work_and_say_where_the_code_is():
    """Every module of the flat layout imports as the module that holds its code now, with a DeprecationWarning
    naming the new path; the paths README showed keep their names."""
    code = """
import importlib, json, sys, warnings
from spra_dist._compat import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    out[old] = [module is importlib.import_module(new), [str(w.message) for w in caught
                                                        if issubclass(w.category, DeprecationWarning)]]
from spra_dist.hf import SpraAdapterCallback, hf_deepspeed_config
from spra_dist.masks import sample_indices
from spra_dist.distributed import init_distributed
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == set(_compat.MOVED)
    for old, (same, warned) in result.items():
        assert same, old
        assert any(f"{old} is now {_compat.MOVED[old]}" in w for w in warned), (old, warned)
