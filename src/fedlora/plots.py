"""The two comparison plots: accuracy per round and accuracy per byte sent, one panel per setting and adapter.

Each line is a group of runs that differ only in their seed (see :mod:`fedlora.results`): the mean over seeds,
with a band of ± one standard deviation for the personalized accuracy. Solid lines are personalized accuracy
(every client's own model on its own test split), dashed lines the global model's accuracy where the method
has one. A method keeps its colour in every panel and in both files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fedlora.registry import METHODS

if TYPE_CHECKING:
    from fedlora.results import Group

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Curve:
    """Seed-averaged curves of one group, at the rounds every seed evaluated."""

    rounds: np.ndarray
    personal: np.ndarray
    personal_std: np.ndarray
    global_: np.ndarray | None  # None where the method has no global model
    mib: np.ndarray  # cumulative MiB sent (up + down) by the end of each round


def curve(group: Group) -> Curve:
    per_run = []
    for run in group.runs:
        cum = np.cumsum([r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in run.records])
        per_run.append({r["round"]: (r.get("acc_personal_mean"), r.get("acc_global"), float(c))
                        for r, c in zip(run.records, cum) if r.get("acc_personal_mean") is not None})
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    pers = np.array([[p[t][0] for p in per_run] for t in rounds], dtype=float).reshape(len(rounds), -1)
    glob = [[p[t][1] for p in per_run] for t in rounds]
    has_global = bool(rounds) and all(v is not None for row in glob for v in row)
    mib = np.array([[p[t][2] for p in per_run] for t in rounds], dtype=float).reshape(len(rounds), -1) / _MIB
    return Curve(rounds=np.array(rounds), personal=pers.mean(axis=1) if rounds else np.array([]),
                 personal_std=pers.std(axis=1, ddof=1) if pers.shape[1] > 1 else np.zeros(len(rounds)),
                 global_=np.array(glob, dtype=float).mean(axis=1) if has_global else None,
                 mib=mib.mean(axis=1) if rounds else np.array([]))


def _colour(method: str) -> Any:
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    names = METHODS.names()
    i = names.index(method) if method in names else len(names) + sum(map(ord, method))
    return palette[i % len(palette)]


def _panels(groups: Sequence[Group]) -> tuple[list[tuple[str, ...]], list[str]]:
    settings = list(dict.fromkeys(g.label[2:] for g in groups))
    adapters = list(dict.fromkeys(g.label[1] for g in groups))
    return settings, adapters  # type: ignore[return-value]


def _plot(groups: Sequence[Group], path: Path, x_of: str, xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    settings, adapters = _panels(groups)
    rows, cols = len(settings), len(adapters)
    height = 4.0 * rows + 0.9  # inches: panels plus room for the title and the legend below them
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, height), squeeze=False, sharey="row")
    methods_seen: list[str] = []
    any_global = False
    log_x = False
    for i, setting in enumerate(settings):
        for j, adapter in enumerate(adapters):
            ax = axes[i][j]
            members = [g for g in groups if g.label[2:] == setting and g.label[1] == adapter]
            xs_all = []
            for g in members:
                c = curve(g)
                if not len(c.rounds):
                    continue
                method = g.label[0] + (f" [{g.config_note}]" if g.config_note else "")
                colour = _colour(g.label[0])
                x = c.rounds if x_of == "round" else c.mib
                xs_all.append(x)
                # Later methods are drawn thinner, so that identical curves still show every colour.
                width = 3.0 - 0.3 * (METHODS.names().index(g.label[0]) if g.label[0] in METHODS else 5)
                ax.plot(x, 100 * c.personal, "-o", color=colour, lw=width, ms=3.5)
                ax.fill_between(x, 100 * (c.personal - c.personal_std), 100 * (c.personal + c.personal_std),
                                color=colour, alpha=0.12, lw=0)
                if c.global_ is not None:
                    any_global = True
                    ax.plot(x, 100 * c.global_, "--", color=colour, lw=1.3)
                if method not in methods_seen:
                    methods_seen.append(method)
            if x_of == "bytes" and xs_all:
                positive = np.concatenate([x[x > 0] for x in xs_all])
                # Methods can differ by orders of magnitude in bytes (FLoRA sends merged weights): log scale then.
                if len(positive) and positive.max() / positive.min() > 30:
                    ax.set_xscale("log")
                    log_x = True
            dataset, partition, clients = setting
            ax.set_title(f"{adapter} — {dataset}, {partition}, {clients} clients", fontsize=10)
            ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel("accuracy (%)")
            ax.grid(True, alpha=0.3)
            if x_of == "round" and xs_all:
                ax.xaxis.get_major_locator().set_params(integer=True)
    handles = [Line2D([], [], color=_colour(m.split(" [")[0]), lw=2.5, label=m) for m in methods_seen]
    handles.append(Line2D([], [], color="0.3", ls="-", label="personalized (± std over seeds)"))
    if any_global:
        handles.append(Line2D([], [], color="0.3", ls="--", label="global model"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4 * cols), fontsize=9, frameon=False)
    fig.suptitle(title + (" (log scale: zero-byte points omitted)" if log_x else ""), fontsize=12)
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1 - 0.35 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_round(groups: Sequence[Group], path: Path) -> None:
    _plot(groups, path, "round", "round (0 = before training)", "Accuracy per round, mean over seeds")


def accuracy_vs_bytes(groups: Sequence[Group], path: Path) -> None:
    _plot(groups, path, "bytes", "MiB sent so far (up + down)", "Accuracy against communication, mean over seeds")
