"""Tables of finished runs: read run directories, aggregate over seeds, write results.csv / results.md / runs.csv.

``fedlora compare`` and ``fedlora report`` both end here (:func:`write_report`), so a table rebuilt from run
directories is the table the comparison wrote. A run counts once it is complete (its ``summary.json`` exists);
runs are grouped by their whole resolved config except the three seeds (``data.seed``, ``train.seed``,
``adapter.seed``), and each group becomes one row: mean ± sample standard deviation over its seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fedlora.registry import ADAPTERS, METHODS
from fedlora.errors import FedloraError
from fedlora.storage import atomic_write, check_output_dir

SEED_KEYS = (("data", "seed"), ("train", "seed"), ("adapter", "seed"))

# (column stem, heading in results.md, kind) for every per-run metric; results.csv has <stem>_mean, <stem>_std.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("personal_acc", "personal acc", "acc"),
    ("personal_acc_weighted", "(weighted)", "acc"),
    ("global_acc", "global acc", "acc"),
    ("rounds_to_95", "rounds to 95%", "rounds"),
    ("bytes_up", "sent up", "bytes"),
    ("bytes_down", "sent down", "bytes"),
    ("wall_s", "time", "seconds"),
    ("agg_error", "agg error", "error"),
)
GROUP_COLUMNS = ("method", "adapter", "dataset", "partition", "num_clients", "config", "seeds", "n")
RUN_COLUMNS = ("run", "method", "adapter", "seed", "dataset", "partition", "num_clients")


@dataclass(frozen=True)
class RunResult:
    """One complete run directory: its resolved config (as TOML tables), summary and per-round records."""

    path: Path
    config: Mapping[str, Mapping[str, Any]]
    summary: Mapping[str, Any]
    records: Sequence[Mapping[str, Any]]

    @property
    def method(self) -> str:
        return str(self.config["method"]["name"])

    @property
    def adapter(self) -> str:
        return str(self.config["adapter"]["kind"])

    @property
    def seed(self) -> int:
        return int(self.config["data"].get("seed", 0))

    def value(self, section: str, key: str, default: Any = None) -> Any:
        return self.config.get(section, {}).get(key, default)

    def setting(self) -> tuple[str, str, int]:
        """(dataset, partition, clients): the experimental setting a row belongs to."""
        partition = str(self.value("data", "partition", ""))
        if partition == "dirichlet":
            partition = f"dirichlet({self.value('data', 'alpha')})"
        elif partition == "pathological":
            partition = f"pathological({self.value('data', 'classes_per_client')})"
        return str(self.value("data", "dataset", "")), partition, int(self.value("data", "num_clients", 0))

    def group_key(self) -> str:
        """The config without its seeds: runs with the same key differ only in their seed."""
        raw = {s: dict(v) for s, v in self.config.items()}
        for section, key in SEED_KEYS:
            raw.get(section, {}).pop(key, None)
        return json.dumps(raw, sort_keys=True)


def is_complete(path: Path) -> bool:
    return (path / "summary.json").is_file() and (path / "config.toml").is_file()


def load_run(path: str | Path) -> RunResult:
    """Read a complete run directory; a missing or unreadable file is a :class:`FedloraError` naming it."""
    p = Path(path)
    if not is_complete(p):
        raise FedloraError(f"{str(p)!r} is not a finished fedlora run (no summary.json / config.toml)")
    try:
        config = tomllib.loads((p / "config.toml").read_text(encoding="utf-8"))
        summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
        metrics = p / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()] \
            if metrics.is_file() else []
    except (OSError, ValueError) as e:
        raise FedloraError(f"cannot read the run in {str(p)!r}: {e}") from None
    _check_shapes(p, config, summary, records)
    return RunResult(p, config, summary, records)


# summary.json fields the tables read, each a number or null.
_NUMERIC_SUMMARY = ("acc_personal_mean", "acc_personal_weighted", "acc_global", "bytes_up_total", "bytes_down_total",
                    "wall_seconds")


def _check_shapes(p: Path, config: Any, summary: Any, records: Any) -> None:
    """Refuse, naming the file and the field, a run whose files parse but do not hold what the tables read."""
    if not isinstance(summary, dict):
        raise FedloraError(f"{str(p / 'summary.json')!r} is malformed: expected a JSON object, got "
                           f"{type(summary).__name__}")
    for key in _NUMERIC_SUMMARY:
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FedloraError(f"{str(p / 'summary.json')!r} is malformed: {key} = {value!r} is not a number")
    for section, key in (("method", "name"), ("adapter", "kind")):
        if not isinstance(config.get(section), dict) or not isinstance(config[section].get(key), str):
            raise FedloraError(f"{str(p / 'config.toml')!r} is malformed: it has no {section}.{key}")
    for i, r in enumerate(records, start=1):
        if not isinstance(r, dict) or not isinstance(r.get("round"), int):
            raise FedloraError(f"{str(p / 'metrics.jsonl')!r} is malformed: line {i} is not a round record")


def find_runs(paths: Iterable[str | Path]) -> tuple[list[RunResult], list[Path]]:
    """Complete runs under ``paths`` (each a run directory, a compare directory or a folder of run directories),
    and the incomplete run directories found on the way (config.toml without summary.json)."""
    runs: list[RunResult] = []
    incomplete: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        p = Path(given)
        if not p.is_dir():
            raise FedloraError(f"{str(p)!r} is not a directory")
        if (p / "config.toml").is_file():
            candidates = [p]
        else:
            root = p / "runs" if (p / "runs").is_dir() else p
            candidates = sorted(d for d in root.iterdir() if d.is_dir() and (d / "config.toml").is_file())
        for d in candidates:
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            if is_complete(d):
                runs.append(load_run(d))
            else:
                incomplete.append(d)
    return runs, incomplete


# ------------------------------------------------------------------------------------------- per-run metrics

def rounds_to_fraction(records: Sequence[Mapping[str, Any]], key: str = "acc_personal_mean",
                       fraction: float = 0.95) -> int | None:
    """The first evaluated round (0 = before training) whose ``key`` reaches ``fraction`` of the final value."""
    evaluated = [(r["round"], r[key]) for r in records if r.get(key) is not None]
    if not evaluated:
        return None
    final = evaluated[-1][1]
    return next(rnd for rnd, v in evaluated if v >= fraction * final)


def run_metrics(run: RunResult) -> dict[str, float | None]:
    """The per-run values behind each column of results.csv."""
    s = run.summary
    errors = [r["agg_error"] for r in run.records if r.get("round", 0) > 0 and r.get("agg_error") is not None]
    return {
        "personal_acc": s.get("acc_personal_mean"),
        "personal_acc_weighted": s.get("acc_personal_weighted"),
        "global_acc": s.get("acc_global"),
        "rounds_to_95": rounds_to_fraction(run.records),
        "bytes_up": s.get("bytes_up_total"),
        "bytes_down": s.get("bytes_down_total"),
        "wall_s": s.get("wall_seconds"),
        # Mean over trained rounds of ||ideal - delivered|| / ||ideal||, where the method logs it.
        "agg_error": statistics.fmean(errors) if errors else None,
    }


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the values that exist; std is None below two values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


# ------------------------------------------------------------------------------------------------- groups

def _order(name: str, names: Sequence[str]) -> int:
    return names.index(name) if name in names else len(names)


@dataclass
class Group:
    """Runs that differ only in their seeds: one row of results.csv."""

    runs: list[RunResult]
    config_note: str = ""  # the keys that tell this group apart from another with the same label
    stats: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @property
    def first(self) -> RunResult:
        return self.runs[0]

    @property
    def label(self) -> tuple[str, str, str, str, int]:
        return (self.first.method, self.first.adapter, *self.first.setting())

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    def sort_key(self) -> tuple[Any, ...]:
        method, adapter, dataset, partition, clients = self.label
        return (dataset, partition, clients, _order(method, METHODS.names()), method,
                _order(adapter, ADAPTERS.names()), adapter, self.config_note)


def _differences(groups: Sequence[Group]) -> list[str]:
    """For groups with the same label: ``section.key=value`` of every key whose value is not the same in all."""
    flat = []
    for g in groups:
        flat.append({f"{s}.{k}": v for s, table in g.first.config.items() for k, v in table.items()
                     if (s, k) not in SEED_KEYS})
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    return ["; ".join(f"{k}={f.get(k)}" for k in varying) for f in flat]


def group_runs(runs: Sequence[RunResult]) -> list[Group]:
    """Group runs by config without seeds; compute every metric's mean and std; sort by setting, method, adapter."""
    by_key: dict[str, list[RunResult]] = {}
    for run in runs:
        by_key.setdefault(run.group_key(), []).append(run)
    groups = [Group(sorted(rs, key=lambda r: r.seed)) for rs in by_key.values()]
    by_label: dict[tuple[Any, ...], list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) > 1:
            for g, note in zip(same, _differences(same)):
                g.config_note = note
    for g in groups:
        per_run = [run_metrics(r) for r in g.runs]
        g.stats = {stem: mean_std([m[stem] for m in per_run]) for stem, _, _ in METRICS}
    return sorted(groups, key=Group.sort_key)


# ------------------------------------------------------------------------------------------------ writing

def _csv_value(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.6g}"
    return x


def results_csv(groups: Sequence[Group]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([*GROUP_COLUMNS, *(f"{stem}_{s}" for stem, _, _ in METRICS for s in ("mean", "std"))])
    for g in groups:
        method, adapter, dataset, partition, clients = g.label
        row: list[Any] = [method, adapter, dataset, partition, clients, g.config_note,
                          " ".join(map(str, g.seeds)), len(g.runs)]
        for stem, _, _ in METRICS:
            row += [_csv_value(v) for v in g.stats[stem]]
        w.writerow(row)
    return out.getvalue()


def runs_csv(runs: Sequence[RunResult]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([*RUN_COLUMNS, *(stem for stem, _, _ in METRICS), "path"])
    for r in sorted(runs, key=lambda r: (r.setting(), _order(r.method, METHODS.names()), _order(r.adapter, ADAPTERS.names()),
                                         r.seed)):
        m = run_metrics(r)
        w.writerow([r.path.name, r.method, r.adapter, r.seed, *r.setting(),
                    *(_csv_value(m[stem]) for stem, _, _ in METRICS), str(r.path)])
    return out.getvalue()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(kind: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    if kind == "acc":
        text, spread = f"{100 * mean:.1f}", (None if std is None else f"{100 * std:.1f}")
    elif kind == "bytes":
        return format_bytes(mean)  # identical across seeds for a fixed config: no spread worth printing
    elif kind == "rounds":
        text, spread = f"{mean:.1f}", (None if std is None else f"{std:.1f}")
    elif kind == "seconds":
        return f"{mean:.0f} s"
    else:
        text, spread = f"{mean:.3g}", (None if std is None else f"{std:.2g}")
    return text if spread is None else f"{text} ± {spread}"


def results_markdown(groups: Sequence[Group], skipped: Sequence[str] = (), incomplete: Sequence[Path] = ()) -> str:
    """The table of results.md: one section per setting, accuracies in percent, mean ± std over seeds."""
    lines = ["# fedlora results", "",
             "Mean ± sample standard deviation over seeds of each run's final values. Accuracies in percent; "
             "*personal acc*: every client's own model on its own test split (mean over clients, then the "
             "example-weighted mean); *global acc*: the global model on the held-out global test set (— where the "
             "method has none); *rounds to 95%*: first evaluated round reaching 95% of the final personal acc; "
             "*sent up/down*: bytes of every message in the run; *agg error*: mean over rounds of "
             "‖ideal − delivered update‖/‖ideal‖ where the method logs it.", ""]
    metrics = [m for m in METRICS if m[0] != "agg_error" or any(g.stats["agg_error"][0] is not None for g in groups)]
    settings: dict[tuple[Any, ...], list[Group]] = {}
    for g in groups:
        settings.setdefault(g.label[2:], []).append(g)
    for (dataset, partition, clients), rows in settings.items():
        lines += [f"## {dataset}, {partition}, {clients} clients", ""]
        note = any(g.config_note for g in rows)
        head = ["method", "adapter", *(["config"] if note else []), "seeds", *(h for _, h, _ in metrics)]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for g in rows:
            cells = [g.label[0], g.label[1], *([g.config_note] if note else []), ",".join(map(str, g.seeds)),
                     *(_cell(kind, *g.stats[stem]) for stem, _, kind in metrics)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if skipped:
        lines += ["## Not run", "", *(f"- {s}" for s in skipped), ""]
    if incomplete:
        lines += ["## Incomplete runs (left out)", "", *(f"- `{p}`" for p in incomplete), ""]
    return "\n".join(lines)


def write_report(paths: Iterable[str | Path], out: str | Path, skipped: Sequence[str] = ()) -> tuple[list[Group], list[Path]]:
    """Read every complete run under ``paths``; write results.csv, results.md, runs.csv and the two plots into
    ``out``. Returns the groups (rows) and the incomplete run directories that were left out."""
    from fedlora import plots

    runs, incomplete = find_runs(paths)
    if not runs:
        raise FedloraError("no finished runs found (a run is finished when its summary.json exists) in: "
                           + ", ".join(str(p) for p in paths))
    out = Path(out)
    check_output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    skipped_file = out / "skipped.json"
    if not skipped and skipped_file.is_file():  # `fedlora report DIR` keeps what `compare` said it skipped
        skipped = json.loads(skipped_file.read_text(encoding="utf-8"))
    groups = group_runs(runs)
    atomic_write(out / "results.csv", results_csv(groups))
    atomic_write(out / "runs.csv", runs_csv(runs))
    atomic_write(out / "results.md", results_markdown(groups, skipped, incomplete))
    plots.accuracy_vs_round(groups, out / "accuracy_vs_round.png")
    plots.accuracy_vs_bytes(groups, out / "accuracy_vs_bytes.png")
    return groups, incomplete
