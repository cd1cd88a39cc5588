"""``data.dataset = "python-functions"``: "complete this function" examples from the Python standard library.

Every machine that runs fedlora has real, documented code on disk: the standard library's own source. Each
public function or method with a docstring and a real body becomes one example:

* prompt (the *input*): its decorators, signature and docstring, dedented;
* response: the rest of its body (the statements after the docstring), with its indentation.

Found with :mod:`ast` over the ``.py`` files of ``sysconfig.get_paths()["stdlib"]`` (nothing is imported or
executed). Skipped: private names (a leading underscore), functions without a docstring, trivial ones (fewer
than :data:`MIN_STATEMENTS` statements after the docstring), very long ones (over :data:`MAX_CHARS` characters
of prompt or body), private modules (``_pydecimal``), generated files (a "generated ... do not edit" header,
the ``encodings`` codecs), tests, demos and vendored packages (:data:`SKIP_DIRS`); bodies seen before (by their
stripped text) are dropped.

An example's partition label is its top-level package (``email``, ``json``, ``asyncio``, ... ; ``os`` for
``os.py``), so a Dirichlet split gives clients different codebases, as organisations have. The global test set
is **held out by module**: whole files, drawn with ``data.seed`` until they hold ``data.test_fraction`` of the
examples, so no test function shares a file with a training one. ``data.max_examples`` (0: all) then keeps a
stratified subsample of each side in that proportion.

The examples are those of the running interpreter's standard library: another Python version gives another
(similar) dataset.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlora.config import DataConfig
from fedlora.data.instructions import InstructionDataset
from fedlora.data.partition import stratified_subsample
from fedlora.errors import DataError

INSTRUCTION = ("Complete this Python function. Write only its body (the indented code after the docstring), "
               "without repeating the signature.")
MIN_STATEMENTS = 2  # after the docstring; one statement is mostly `return x` or `pass`
MAX_CHARS = 1500  # of the prompt and of the body: longer functions would only be truncated
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "site-packages",
                       "dist-packages", "ensurepip", "pydoc_data", "encodings", "__pycache__", "venv"})
_GENERATED_HEAD = 2000  # characters of a file searched for a "generated" header


@dataclass(frozen=True)
class Function:
    """One extracted function: where it comes from and its two halves."""

    module: str  # dotted module name, e.g. "email.mime.text"
    name: str
    prompt: str
    body: str

    @property
    def package(self) -> str:
        return self.module.split(".", 1)[0]


def stdlib_root() -> Path:
    """The directory of the standard library's source."""
    return Path(sysconfig.get_paths()["stdlib"])


def _generated(text: str) -> bool:
    head = text[:_GENERATED_HEAD].lower()
    return "generated" in head and ("do not edit" in head or "automatically" in head or "auto-generated" in head)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _functions_of(source: str, module: str) -> list[Function]:
    """The examples of one module's source (the rules in the module docstring)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        if ast.get_docstring(node) is None or len(node.body) - 1 < MIN_STATEMENTS or node.end_lineno is None:
            continue
        doc_end = node.body[0].end_lineno or node.lineno
        if node.body[1].lineno <= doc_end:  # statements on the docstring's own line
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        text = textwrap.dedent("".join(lines[start:node.end_lineno]))
        split = doc_end - start  # lines of decorators + signature + docstring
        head = text.splitlines(keepends=True)
        prompt, body = "".join(head[:split]), "".join(head[split:]).rstrip() + "\n"
        if prompt[:1].isspace() or not body.strip() or max(len(prompt), len(body)) > MAX_CHARS:
            continue  # a docstring line left of the def (dedent found no common indent), empty or too long
        out.append(Function(module, node.name, prompt, body))
    return out


def _source_files(base: Path) -> list[Path]:
    """The ``.py`` files to read, sorted; skipped folders are pruned, not walked (``test`` alone is large)."""
    files = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(("_", "."))]
        files += [Path(folder) / n for n in names if n.endswith(".py") and not n.startswith(("_", "test_"))
                  or n == "__init__.py"]
    return sorted(files)


@functools.lru_cache(maxsize=2)
def extract(root: str) -> tuple[Function, ...]:
    """Every example of the standard library at ``root``, in a stable order (sorted files, source order)."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"python-functions: the standard library source {root!r} is not a directory")
    seen: set[str] = set()
    found = []
    for path in _source_files(base):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if _generated(source):
            continue
        for fn in _functions_of(source, _module_name(base, path)):
            key = "\n".join(line.strip() for line in fn.body.splitlines())
            if key not in seen:
                seen.add(key)
                found.append(fn)
    if not found:
        raise DataError(f"python-functions: no functions with docstrings found under {root!r} (is the standard "
                        "library's source installed?)")
    return tuple(found)


def held_out_modules(modules: list[str], sizes: dict[str, int], fraction: float, seed: int) -> set[str]:
    """Whole modules, in an order drawn from ``seed``, until they hold ``fraction`` of the examples."""
    # Order by a seeded hash of the name: stable whatever the set of modules, unlike a permutation of a list.
    def key(m: str) -> bytes:
        return hashlib.blake2b(f"{seed}:{m}".encode(), digest_size=8).digest()

    target, total, chosen = fraction * sum(sizes.values()), 0, set()
    for m in sorted(modules, key=key):
        if total >= target:
            break
        chosen.add(m)
        total += sizes[m]
    return chosen


def python_functions(cfg: DataConfig, root: str | None = None) -> InstructionDataset:
    """The dataset: training functions first, then the held-out modules' functions (``held_out``)."""
    fns = extract(str(root or stdlib_root()))
    sizes: dict[str, int] = {}
    for fn in fns:
        sizes[fn.module] = sizes.get(fn.module, 0) + 1
    test_modules = held_out_modules(sorted(sizes), sizes, cfg.test_fraction, cfg.seed)
    train = [f for f in fns if f.module not in test_modules]
    test = [f for f in fns if f.module in test_modules]
    packages = tuple(sorted({f.package for f in fns}))
    ids = {p: i for i, p in enumerate(packages)}
    if 0 < cfg.max_examples < len(fns):
        n_test = min(max(round(cfg.max_examples * cfg.test_fraction), 1), len(test))
        n_train = min(cfg.max_examples - n_test, len(train))
        train = [train[i] for i in stratified_subsample(np.array([ids[f.package] for f in train]), n_train, cfg.seed)]
        test = [test[i] for i in stratified_subsample(np.array([ids[f.package] for f in test]), n_test, cfg.seed)]
    rows = train + test
    return InstructionDataset("python-functions", (INSTRUCTION,) * len(rows), tuple(f.prompt for f in rows),
                              tuple(f.body for f in rows), np.array([ids[f.package] for f in rows], dtype=np.int64),
                              packages, held_out=np.arange(len(train), len(rows), dtype=np.int64))
