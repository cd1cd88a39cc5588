"""Accurate aggregation on real data (issue 3): FLoRA-NA's factor split, and agg_error / accuracy per method.

    .venv/bin/python benchmarks/demo_aggregation.py split [--seeds 0,1,2]   # choose method.na_split
    .venv/bin/python benchmarks/demo_aggregation.py table [--seeds 0]       # every registered method
    .venv/bin/python benchmarks/demo_aggregation.py ranks [--seeds 0]       # clients of ranks 4, 8, 16

``split``: FLoRA-NA with ``na_split = balanced`` and ``= fedit-scale`` on both bundled classification datasets
(minilm, Dirichlet 0.5, 3 clients) at the replication budget of ``benchmarks/paper_claims.py`` (short runs, so
that several seeds fit), every seed on the identical partition for both splits. The product B̂Â, and so the
round's global model, is the same for both splits; what differs is how the next round's local training moves
from it, so the comparison is of final accuracies. The default of ``method.na_split`` is the one with the
higher mean global accuracy (ties: personalized accuracy).

``table``: the default demo configuration (``fedlora run`` without a config file: minilm, rotten-tomatoes,
2,400 examples, 3 clients Dirichlet 0.5, LoRA r=8 on q/v, 8 rounds × 10 local steps; LoRA-SB for Fed-SB, which
takes no other kind) with every registered method:
``agg_error`` at rounds 1, 4 and 8, the final global and personalized accuracy, MiB up and down, wall time.
``ranks``: the same with client ranks [4, 8, 16], for every method that accepts per-client ranks (FLoRA, FlexLoRA,
FLoRA-NA). Every run is a ``fedlora compare`` grid into ``--out``, so the command is resumable: run it again and
finished runs are reused.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fedlora import config  # noqa: E402
from fedlora.compare import compare  # noqa: E402
from fedlora.registry import METHODS, fitting_adapters  # noqa: E402
from fedlora.results import RunResult, find_runs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from paper_claims import BUDGET  # noqa: E402  (the replication's per-run budget)

SPLITS = ("balanced", "fedit-scale")
DATASETS = ("rotten-tomatoes", "bbc-news")
HETERO_RANKS = "[4,8,16]"


def _runs(where: Path) -> list[RunResult]:
    return find_runs([where])[0] if where.is_dir() else []


def _mean(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.fmean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def split(args: argparse.Namespace) -> str:
    lines = ["| dataset | na_split | global acc % | personalized acc % (mean) | mean agg_error | runs |",
             "|---|---|---|---|---|---|"]
    score: dict[str, list[float]] = {s: [] for s in SPLITS}
    for dataset in DATASETS:
        for name in SPLITS:
            where = Path(args.out) / "split" / f"{dataset}-{name}"
            cfg = config.load(None, [*BUDGET, f"data.dataset={dataset}", "data.partition=dirichlet",
                                     "data.num_clients=3", f"method.na_split={name}", *args.overrides])
            compare(cfg, ["flora-na"], ["lora"], args.seeds, where, progress=not args.quiet)
            runs = _runs(where)
            glob = [r.summary["acc_global"] for r in runs]
            pers = [r.summary["acc_personal_mean"] for r in runs]
            errs = [statistics.fmean(x["agg_error"] for x in r.records if x.get("round", 0) > 0
                                     and x.get("agg_error") is not None) for r in runs]
            score[name] += glob
            lines.append(f"| {dataset} | {name} | {_mean(glob)} | {_mean(pers)} | "
                         f"{statistics.fmean(errs):.2e} | {len(runs)} |")
    best = max(SPLITS, key=lambda s: statistics.fmean(score[s]))
    lines.append("")
    lines.append("mean global accuracy over both datasets and every seed: "
                 + ", ".join(f"{s} {100 * statistics.fmean(score[s]):.2f}%" for s in SPLITS) + f" → {best}")
    return "\n".join(lines)


AT_ROUNDS = (1, 4, 8)  # the rounds whose agg_error the table shows


def _row(label: str, path: Path) -> str:
    run = find_runs([path])[0][0]
    errs = {x["round"]: x.get("agg_error") for x in run.records}
    cells = [f"{errs[t]:.1e}" if errs.get(t) is not None else "–" for t in AT_ROUNDS]
    s = run.summary
    glob = f"{100 * s['acc_global']:.1f}" if s.get("acc_global") is not None else "–"
    return (f"| {label} | {run.seed} | " + " | ".join(cells) + f" | {glob} | {100 * s['acc_personal_mean']:.1f} / "
            f"{100 * s['acc_personal_weighted']:.1f} | {s['bytes_up_total'] / 2**20:.2f} / "
            f"{s['bytes_down_total'] / 2**20:.2f} | {s['wall_seconds']:.0f} |")


def _head(first: str) -> list[str]:
    head = f"| {first} | seed | " + " | ".join(f"agg_error r{t}" for t in AT_ROUNDS) \
        + " | global acc % | personalized acc % (mean / weighted) | MiB up / down | wall s |"
    return [head, "|" + "---|" * (len(AT_ROUNDS) + 6)]


def table(args: argparse.Namespace) -> str:
    """Every registered method (or --methods) on the default demo configuration, LoRA (a method that does not take
    LoRA runs with the first adapter kind it fits: Fed-SB with LoRA-SB)."""
    methods = args.methods.split(",") if args.methods else list(METHODS.names())
    adapters = ["lora"] + sorted({fitting_adapters(METHODS[m])[0] for m in methods
                                  if "lora" not in fitting_adapters(METHODS[m])})
    where = Path(args.out) / "table"
    compare(config.load(None, args.overrides), methods, adapters, args.seeds, where, progress=not args.quiet)
    runs = sorted(_runs(where), key=lambda r: (methods.index(r.method) if r.method in methods else len(methods),
                                               r.seed))
    lines = _head("method")
    lines += [_row(r.method, r.path) for r in runs if r.method in methods]
    return "\n".join(lines)


def ranks(args: argparse.Namespace) -> str:
    """The methods that accept per-client ranks, with clients of ranks [4, 8, 16] on the demo configuration."""
    methods = [m for m, cls in METHODS.items() if "per-client-ranks" in cls.provides]
    where = Path(args.out) / "ranks"
    cfg = config.load(None, [f"method.name={methods[0]}", f"adapter.rank={HETERO_RANKS}", *args.overrides])
    compare(cfg, methods, ["lora"], args.seeds, where, progress=not args.quiet)
    lines = _head(f"method (ranks {HETERO_RANKS})")
    lines += [_row(r.method, r.path) for r in sorted(_runs(where), key=lambda r: (methods.index(r.method), r.seed))]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("split", "table", "ranks"))
    ap.add_argument("--methods", default=None, help="table: comma-separated methods (default: every registered one)")
    ap.add_argument("--out", default="runs/demo_aggregation", help="where the runs go (resumable)")
    ap.add_argument("--seeds", default=None, help="default: 0,1,2 for split, 0 for table")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    args.seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.what == "split" else "0")).split(",")]
    text = {"split": split, "table": table, "ranks": ranks}[args.what](args)
    print(text)
    report = Path(args.out) / f"{args.what}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text + "\n", encoding="utf-8")
    print(f"written to {report}")


if __name__ == "__main__":
    main()
