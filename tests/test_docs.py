"""README.md and docs/*.md as a reader meets them: every fenced block runs as written or says why it can't, the
README stays a front page (at most 200 lines), and every relative link lands on a file and every ``#anchor`` on a
heading of that file.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_docs.py

A page runs in a fresh directory holding symlinks to the repository's ``configs/``, ``launch/`` and ``bench/`` (what
a reader at the repository root sees), its blocks in order, by language:

- ``bash``: line by line (a line ending in ``\\`` continues on the next); each must exit 0. A plain ``spra ...``
  line runs ``spra_dist.cli.main`` in the page's process (the console script's function, without a new
  interpreter's start), unless it starts a process group (``engine=`` ddp / fsdp2 / deepspeed).
- ``python``: in one interpreter per page, like the cells of a notebook: a later block may use what an earlier one
  defined (a page says so where its blocks continue each other).
- ``yaml``: parsed; one whose top-level keys are all training-config keys is loaded with ``load_config``.
- ``json``, ``jsonl``, ``csv``: example data files, parsed.
- ``text``: an output sample or a listing, not code.

An HTML comment on the line before a block changes what happens to it:

- ``<!-- not run: REASON -->``: exempt. REASON starts with one of ``REASONS``; "takes longer than the suite allows"
  must give the time, and "same as PAGE" needs the very same block to run on PAGE.
- ``<!-- file: NAME -->``: written to NAME in the page's directory instead of being run; a bash line of the page,
  after it, must use it.

This file is also the page runner (``__main__`` below): the test starts it in the page's directory with the page's
blocks, so that what the blocks import, start or change stays in that process.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
LINKED = ("configs", "launch", "bench")  # symlinked into each page's directory
RUN = {"bash", "python", "yaml"}
DATA = {"json", "jsonl", "csv"}
NOT_CODE = {"text"}
REASONS = ("needs a GPU", "needs several nodes", "needs network access", "is the test suite itself",
           "takes longer than the suite allows", "same as ")
"""How a ``<!-- not run: ... -->`` reason may begin; anything else is refused."""
TIME = re.compile(r"\d+(\.\d+)?\s*(s|seconds?|minutes?|hours?)\b")
COMMAND_TIMEOUT_S = 600
PAGE_TIMEOUT_S = 1200

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^`]*)$")
NOTE = re.compile(r"^\s*<!--\s*(?P<kind>not run|file):\s*(?P<text>.*?)\s*-->\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@dataclass
class Block:
    page: str   # relative to the repository root
    line: int   # of the opening fence, 1-based
    lang: str
    code: str
    note: str = ""   # "not run", "file" or ""
    text: str = ""   # the reason, or the file name

    @property
    def runs(self) -> bool:
        return not self.note and self.lang in RUN | DATA


def doc_pages() -> list[Path]:
    """README.md and every docs/*.md, generated ones included."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def split_page(page: Path) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks, and its lines outside them (fenced lines blanked, so line numbers stay)."""
    lines = page.read_text().splitlines()
    blocks, prose, i = [], list(lines), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        end = i + 1
        while end < len(lines) and not re.fullmatch(rf"[ \t]*{fence}`*[ \t]*", lines[end]):
            end += 1
        assert end < len(lines), f"{rel(page)}:{i + 1}: a fenced block that is never closed"
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
        note = NOTE.match(lines[i - 1]) if i else None
        blocks.append(Block(rel(page), i + 1, info.split()[0] if info else "", "\n".join(body) + "\n",
                            note["kind"] if note else "", note["text"] if note else ""))
        for j in range(i, end + 1):
            prose[j] = ""
        i = end + 1
    return blocks, prose


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets and formatting dropped, lower case, punctuation removed,
    spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in split_page(page)[1]:
        m = HEADING.match(line)
        if m:
            base = slug(m[2])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """``page:line: target (why)`` for each relative link that doesn't resolve."""
    out = []
    for number, line in enumerate(split_page(page)[1], 1):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                out.append(f"{rel(page)}:{number}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                out.append(f"{rel(page)}:{number}: {target} (no heading #{anchor} in {dest.name})")
    return out


def bash_commands(code: str) -> list[str]:
    """The lines of a bash block, continuation lines joined; blank and comment lines dropped."""
    out, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


# ---------------------------------------------------------------------------------------------- the page runner


class _Tee(io.TextIOBase):
    """Writes to every stream given: a block's output is shown and kept."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _is_training_config(raw: object) -> bool:
    from spra_dist.train.config import valid_keys

    sections = {key.split(".")[0] for key in valid_keys()}
    return isinstance(raw, dict) and bool(raw) and set(raw) <= sections


def spra_argv(command: str) -> list[str] | None:
    """The arguments of a plain ``spra ...`` line that runs in one process, else None (a launcher, a pipe, an
    engine that starts a process group: those run in a shell of their own)."""
    if not command.startswith("spra ") or any(c in command for c in "|&;<>$`"):
        return None
    argv = shlex.split(command, comments=True)[1:]
    if any(a.startswith("engine=") and a != "engine=none" for a in argv):
        return None
    return argv


def run_spra(argv: list[str]) -> tuple[int, str, str]:
    """``spra ARGV`` in this process: the console script is ``spra_dist.cli:main``, so this is the command minus
    the interpreter's start and imports, which a page's later commands would pay again (tests/test_cli.py and
    tests/test_wheel.py start the command itself)."""
    from spra_dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, out)), contextlib.redirect_stderr(_Tee(sys.stderr, err)):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def run_blocks(blocks: list[Block]) -> list[dict]:
    """Run the blocks in this process's working directory; returns what each produced (see ``__main__``)."""
    namespace: dict = {"__name__": "__main__"}
    results, start = [], time.monotonic()
    for b in blocks:
        where = f"{b.page}:{b.line}"
        print(f"\n=== {where} ({b.lang}{', file ' + b.text if b.note == 'file' else ''}) "
              f"at {time.monotonic() - start:.1f} s", flush=True)
        if b.note == "file":
            Path(b.text).write_text(b.code)
        elif b.lang == "python":
            captured = io.StringIO()
            # Padded so that a traceback's line numbers are the page's.
            code = compile("\n" * b.line + b.code, b.page, "exec")
            with contextlib.redirect_stdout(_Tee(sys.stdout, captured)):
                exec(code, namespace)
            results.append({"where": where, "stdout": captured.getvalue()})
        elif b.lang == "bash":
            for command in bash_commands(b.code):
                print(f"$ {command}    # at {time.monotonic() - start:.1f} s", flush=True)
                argv = spra_argv(command)
                if argv is not None:
                    code, out, err = run_spra(argv)
                else:
                    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                                          timeout=COMMAND_TIMEOUT_S)
                    code, out, err = proc.returncode, proc.stdout, proc.stderr
                print(out[-3000:], err[-3000:], sep="\n", flush=True)
                if code != 0:
                    raise SystemExit(f"{where}: `{command}` exited with {code}")
                results.append({"where": where, "command": command, "stdout": out, "stderr": err})
        elif b.lang == "yaml":
            import yaml

            raw = yaml.safe_load(b.code)
            if _is_training_config(raw):
                from spra_dist.train.config import load_config

                path = Path(f"block-{b.line}.yaml")
                path.write_text(b.code)
                load_config(path)
        elif b.lang in ("json", "jsonl"):
            for line in b.code.splitlines() if b.lang == "jsonl" else [b.code]:
                json.loads(line)
        elif b.lang == "csv":
            widths = {len(row) for row in csv.reader(io.StringIO(b.code))}
            assert len(widths) == 1, f"{where}: rows of different widths {sorted(widths)}"
    return results


# ------------------------------------------------------------------------------------------------------ the tests


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    # the CI runs `make test`, and a hook looks for `make demo` in the README
    assert "make test" in text and "make demo" in text


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for line in split_page(ROOT / "README.md")[1]
              for target in LINK.findall(line)}
    assert [rel(p) for p in doc_pages()[1:] if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", doc_pages(), ids=rel)
def test_links_resolve(page):
    assert broken_links(page) == []


def test_code_paths_named_in_the_docs_exist():
    """Module paths (`spra_dist.x.y`) are the layout's, not the deprecated flat ones, and import with their
    attributes; files named `spra_dist/...` exist."""
    import importlib

    from spra_dist._compat import MOVED

    missing = []
    for page in doc_pages():
        text = "\n".join(split_page(page)[1])
        for dotted in sorted(set(re.findall(r"`(spra_dist(?:\.\w+)+)", text))):
            parts = dotted.split(".")
            old = [".".join(parts[:cut]) for cut in range(2, len(parts) + 1) if ".".join(parts[:cut]) in MOVED]
            if old:
                missing.append(f"{rel(page)}: {dotted} (now {MOVED[old[0]]})")
                continue
            for cut in range(len(parts), 0, -1):  # the longest prefix that is a module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                    break
                except ModuleNotFoundError:
                    continue
            for name in parts[cut:]:
                if not hasattr(obj, name):
                    missing.append(f"{rel(page)}: {dotted} (no {name})")
                    break
                obj = getattr(obj, name)
        for path in sorted(set(re.findall(r"`(spra_dist/[\w/.]+)", text))):
            if not (ROOT / path).exists():
                missing.append(f"{rel(page)}: {path} (no such file)")
    assert missing == []


# Where a command or snippet of the docs writes: output_dir=, --out, --json, save_adapter / save_pretrained targets.
WRITES = re.compile(r"""(?:\boutput_dir\s*=\s*|--out[ =]|--json[ =]|save_adapter\([^,\n]+,\s*|save_pretrained\()"""
                    r"""["']?(?P<path>[\w.-]+(?:/[\w.<>-]+)*)""")
DEFAULT_RUN = re.compile(r"spra train --config \S*?(?P<name>[\w-]+)\.yaml")  # output_dir defaults to runs/<name>


def written_paths() -> set[str]:
    """The paths in the checkout that the fenced commands and snippets of README.md and docs/ write."""
    paths = set()
    for page in doc_pages():
        for block in split_page(page)[0]:
            if block.lang not in RUN:
                continue
            for line in block.code.splitlines():
                paths |= {m["path"] for m in WRITES.finditer(line) if not m["path"].startswith(("/", "~"))}
                if "output_dir" not in line:
                    paths |= {f"runs/{m['name']}" for m in DEFAULT_RUN.finditer(line)}
    return paths


def test_gitignore_covers_what_the_docs_write():
    """Nothing a documented command writes shows up as a change in the checkout: runs/, merged/, out/ ..."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: .gitignore only matters in one")
    paths = sorted(written_paths())
    assert {"runs/minilm_rotten_tomatoes", "merged/minilm", "out/adapter"} <= set(paths)  # the README's own
    # A file inside each: a pattern such as `runs/` matches directories only, and these need not exist yet.
    probes = [f"{path}/adapter_config.json" for path in paths]
    proc = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(probes),
                          capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    ignored = set(proc.stdout.splitlines())
    assert [path for path, probe in zip(paths, probes, strict=True) if probe not in ignored] == []


def test_slug_is_githubs():
    assert slug("Set up, test, demo") == "set-up-test-demo"
    assert slug("`spra inspect`, `spra merge`, `spra generate`") == "spra-inspect-spra-merge-spra-generate"
    assert slug("Checking the masks: `spra preprocess`") == "checking-the-masks-spra-preprocess"
    assert slug("torch.compile: spra_dist, LoRA and the floor") == "torchcompile-spra_dist-lora-and-the-floor"


def test_every_block_runs_or_says_why_not():
    pages = {rel(p): split_page(p)[0] for p in doc_pages()}
    problems = []
    for page, blocks in pages.items():
        for i, b in enumerate(blocks):
            where = f"{page}:{b.line}"
            if b.lang not in RUN | DATA | NOT_CODE:
                problems.append(f"{where}: say what the block is (```bash, python, yaml, text, ...), not "
                                f"{b.lang or 'nothing'}")
            if b.note == "not run":
                if not b.text.startswith(REASONS):
                    problems.append(f"{where}: reason {b.text!r} is none of {REASONS}")
                elif b.text.startswith("takes longer") and not TIME.search(b.text):
                    problems.append(f"{where}: say how long it takes")
                elif b.text.startswith("same as "):
                    other = b.text.removeprefix("same as ").split()[0]
                    if not any(o.runs and o.code == b.code for o in pages.get(other, [])):
                        problems.append(f"{where}: no block of {other} runs the same code")
                if b.lang in NOT_CODE:
                    problems.append(f"{where}: a {b.lang} block is not run anyway; drop the note")
            if b.note == "file":
                later = [c for c in blocks[i + 1:] if c.runs and c.lang == "bash" and b.text in c.code]
                if "/" in b.text or not later:
                    problems.append(f"{where}: file {b.text!r} must be a plain name that a later bash line uses")
    assert problems == []


PAGES = [p for p in doc_pages() if any(b.runs for b in split_page(p)[0])]


def stdout_of(results: list[dict], command_start: str) -> str:
    return "".join(r["stdout"] for r in results if r.get("command", "").startswith(command_start))


def check_readme(d: Path, results: list[dict]) -> None:
    assert (d / "out/adapter/adapter.safetensors").is_file() and (d / "out/merged/config.json").is_file()
    assert (d / "merged/minilm/config.json").is_file()
    out = stdout_of(results, "spra generate")
    assert "--- base" in out and "--- adapter" in out, out


def check_adapters(d: Path, results: list[dict]) -> None:
    """What the "Several adapters per base" section promises, as it ran."""
    out = stdout_of(results, "spra generate --adapter runs/tiny_a")
    assert "--- base" in out and "--- adapter" in out, out
    assert list((d / "runs/tiny_a/tensorboard").rglob("events.out.tfevents.*"))
    assert (d / "merged/tiny_ab/model.safetensors").is_file()
    python_out = [r["stdout"] for r in results if "command" not in r]
    assert python_out[-1].strip().splitlines()[-1] == "['b', 'mix'] mix"
    assert (d / "runs/tiny_mix/adapter_config.json").is_file()


def check_scale_out(d: Path, results: list[dict]) -> None:
    """Each launch wrapper ran a 2-rank job that formed one group (the engine read from the wrapper's settings),
    and finished cleanly: accelerate with ZeRO-3 and DeepSpeed's launcher with ZeRO-1 are the routes where a rank
    once aborted at exit ("terminate called without an active exception"); `make stress` repeats every route."""
    for run, world_size, engine in (("fsdp2", 2, "fsdp2"), ("zero3", 2, "deepspeed"), ("zero1", 2, "deepspeed"),
                                    ("ckpt", 1, "fsdp2")):
        summary = json.loads((d / "runs" / run / "summary.json").read_text())
        assert (summary["world_size"], summary["engine"]) == (world_size, engine), (run, summary)
    for r in results:
        if r.get("command", "").startswith("launch/"):
            assert "terminate called" not in r["stderr"], r["command"]
    assert (d / "runs/ckpt/checkpoints/step-00000004").is_dir()
    for folder in ("checkpoint-1/adapter", "checkpoint-2/adapter", "adapter"):
        assert (d / "runs/hf" / folder / "adapter.safetensors").is_file(), folder


CHECKS = {"README.md": check_readme, "docs/adapters.md": check_adapters, "docs/scale-out.md": check_scale_out}
"""What a page's runs must have left behind, beyond every command exiting 0."""


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_page_runs_as_written(page, tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    plan = tmp_path / "blocks.json"
    plan.write_text(json.dumps([asdict(b) for b in split_page(page)[0] if b.runs or b.note == "file"]))
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(plan)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    if rel(page) in CHECKS:
        CHECKS[rel(page)](tmp_path, results)


if __name__ == "__main__":
    blocks = [Block(**b) for b in json.loads(Path(sys.argv[1]).read_text())]
    Path("results.json").write_text(json.dumps(run_blocks(blocks)))
