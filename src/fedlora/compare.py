"""``fedlora compare``: one command for a comparison table you can trust.

The grid is methods × adapters × seeds on one base config. A seed sets ``data.seed``, ``train.seed`` and
``adapter.seed`` together, so for a given seed every method sees the same subsample, partition, client test
splits, adapter initialisation and batch order; only the aggregation rule differs. Each run has its own run
directory ``DIR/runs/<method>-<adapter>-s<seed>/``. The grid is resumable: a run whose ``summary.json`` exists
is complete and is not redone (its config must match), an incomplete one is redone from scratch. Combinations a
method does not support (its ``adapters``) or the config refuses (e.g. VeRA with FLoRA-NA) are skipped and
named. At the end the tables and plots are written from every complete run under ``DIR/runs`` by the same code
as ``fedlora report``.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from fedlora import config as cfgmod
from fedlora.config import Config
from fedlora.registry import ADAPTERS, RUNTIMES
from fedlora.errors import ConfigError
from fedlora.storage import atomic_write, check_output_dir

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Cell:
    """One run of the grid; ``config`` is None when the combination is skipped (``reason`` says why)."""

    method: str
    adapter: str
    seed: int
    config: Config | None
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}-{self.adapter}-s{self.seed}"


def parse_names(text: str, option: str) -> list[str]:
    """``"a,b, c"`` → ``["a", "b", "c"]`` (duplicates dropped, order kept)."""
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not names:
        raise ConfigError(f"{option} {text!r} is empty; give a comma-separated list")
    return names


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or a range ``"0-4"`` (inclusive)."""
    seeds: list[int] = []
    for part in parse_names(text, "--seeds"):
        try:
            if "-" in part.strip("-"):
                lo, hi = part.split("-", 1)
                seeds += range(int(lo), int(hi) + 1)
            else:
                seeds.append(int(part))
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: {part!r} is not an integer or a range like 0-2") from None
    return list(dict.fromkeys(seeds))


def seed_overrides(seed: int) -> dict[str, dict[str, int]]:
    """What one grid seed sets: the data (subsample, partition), the training and the adapter initialisation."""
    return {"data": {"seed": seed}, "train": {"seed": seed}, "adapter": {"seed": seed}}


def plan(base: Config, methods: Sequence[str], adapters: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """Every (method, adapter, seed) with its resolved config, or the reason it is skipped."""
    from fedlora.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: {', '.join(map(repr, unknown))} not available in this version; "
                          f"available: {', '.join(METHODS)}")
    bad = [a for a in adapters if a not in ADAPTERS]
    if bad:
        raise ConfigError(f"--adapters: {', '.join(map(repr, bad))} unknown; choose from: {', '.join(ADAPTERS)}")
    cells = []
    for method in methods:
        for adapter in adapters:
            for seed in seeds:
                raw = {"method": {"name": method}, "adapter": {"kind": adapter}}
                for section, values in seed_overrides(seed).items():
                    raw.setdefault(section, {}).update(values)
                try:
                    cells.append(Cell(method, adapter, seed, cfgmod.from_dict(raw, base=base).resolved()))
                except ConfigError as e:
                    cells.append(Cell(method, adapter, seed, None, str(e)))
    return cells


def skipped_notes(cells: Sequence[Cell]) -> list[str]:
    """One line per skipped (method, adapter, reason), naming the seeds when not all of them are skipped."""
    seeds_of: dict[tuple[str, str, str], list[int]] = {}
    for c in cells:
        if c.config is None:
            seeds_of.setdefault((c.method, c.adapter, c.reason), []).append(c.seed)
    all_seeds = sorted({c.seed for c in cells})
    notes = []
    for (method, adapter, reason), seeds in seeds_of.items():
        which = "" if sorted(seeds) == all_seeds else f" (seeds {', '.join(map(str, seeds))})"
        notes.append(f"{method} × {adapter}{which}: {reason}")
    return notes


def _flatten(raw: dict[str, dict[str, object]]) -> dict[str, object]:
    return {f"{s}.{k}": v for s, table in raw.items() for k, v in table.items()}


def check_same_config(path: Path, config: Config) -> None:
    """Refuse to reuse a complete run made with other settings. Keys only one side has (a newer fedlora added
    a key with its default) and keys left to "auto" are not differences."""
    have = _flatten(tomllib.loads((path / "config.toml").read_text(encoding="utf-8")))
    want = _flatten(tomllib.loads(cfgmod.dumps(config)))
    # "auto" (train.dtype, train.attention) is resolved for the machine when the run is built, and the run's
    # config.toml records the result: any resolved value matches it.
    diffs = [f"{k}: {have[k]!r} there, {want[k]!r} now" for k in sorted(have.keys() & want.keys())
             if have[k] != want[k] and want[k] != "auto"]
    if diffs:
        raise ConfigError(f"{str(path)!r} is a finished run with a different configuration ({'; '.join(diffs[:3])}); "
                          "use another --out, or delete that run directory to redo it")


def run_grid(cells: Sequence[Cell], out: Path, progress: bool = True, tensorboard: bool = False,
             echo: Echo = print) -> tuple[list[Cell], list[Cell]]:
    """Run every runnable cell not already complete under ``out/runs``. Returns (ran, reused)."""
    from tqdm.auto import tqdm

    from fedlora.results import is_complete
    from fedlora.runlog import ObservedRunDir, Observer, RoundBar, TensorBoardLogger, summary_writer_class

    if tensorboard:
        summary_writer_class()  # a missing package is an error before any work
    runnable = [c for c in cells if c.config is not None]
    reused, todo = [], []
    for cell in runnable:
        path = out / "runs" / cell.name
        assert cell.config is not None
        if is_complete(path):
            check_same_config(path, cell.config)
            reused.append(cell)
        else:
            todo.append(cell)
    echo(f"grid: {len(cells)} runs ({len(cells) - len(runnable)} skipped, {len(reused)} already complete, "
         f"{len(todo)} to run) in {out / 'runs'}")
    # One record per trained round, plus round 0 when it is evaluated: the bar moves once per record.
    total = sum(c.config.train.rounds + int(c.config.train.eval_initial) for c in todo if c.config is not None)
    with tqdm(total=total, desc="compare", unit="round", disable=not progress, dynamic_ncols=True) as bar, \
            warnings.catch_warnings():
        # transformers warns about a deprecated attribute PEFT reads, once per model build: noise under the bar.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        for cell in todo:
            assert cell.config is not None
            path = out / "runs" / cell.name
            if path.exists():
                (bar.write if progress else echo)(f"redoing incomplete run {path}")
            observers: list[Observer] = [RoundBar(bar)]
            if tensorboard:
                observers.append(TensorBoardLogger())
            # The grid's runs go through the runtime the config names, like `fedlora run` and fedlora.run().
            RUNTIMES.lookup(cell.config.runtime.kind).run(
                cell.config, ObservedRunDir(path, overwrite=True, observers=observers), progress=False)
    return todo, reused


def compare(base: Config, methods: Sequence[str], adapters: Sequence[str], seeds: Sequence[int], out: str | Path,
            progress: bool = True, tensorboard: bool = False, echo: Echo = print) -> tuple[list[Cell], list[str]]:
    """Plan, run (resuming) and tabulate a grid into ``out``. Returns the cells and the skipped notes."""
    from fedlora.results import write_report

    out = Path(out)
    check_output_dir(out, "--out")
    if base.runtime.kind != "simulation":
        raise ConfigError(f"runtime.kind = {base.runtime.kind!r}: fedlora compare runs every grid cell in the embedded "
                          "simulation; set runtime.kind = 'simulation'")
    cells = plan(base, methods, adapters, seeds)
    notes = skipped_notes(cells)
    for note in notes:
        echo(f"skipped {note}")
    if all(c.config is None for c in cells):
        raise ConfigError("every combination of the grid is skipped; nothing to run")
    out.mkdir(parents=True, exist_ok=True)
    # Grids can be added to one DIR by several calls; the tables cover every run there, so keep every note.
    previous = json.loads((out / "skipped.json").read_text(encoding="utf-8")) if (out / "skipped.json").is_file() else []
    all_notes = list(dict.fromkeys([*previous, *notes]))
    atomic_write(out / "skipped.json", json.dumps(all_notes, indent=1, ensure_ascii=False) + "\n")
    run_grid(cells, out, progress=progress, tensorboard=tensorboard, echo=echo)
    write_report([out], out, all_notes)
    return cells, notes
