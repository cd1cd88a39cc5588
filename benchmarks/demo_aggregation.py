"""Accurate aggregation on real data (issue 3): FLoRA-NA's factor split, and agg_error / accuracy per method.

    .venv/bin/python benchmarks/demo_aggregation.py split [--seeds 0,1,2]   # choose method.na_split
    .venv/bin/python benchmarks/demo_aggregation.py table [--seeds 0]       # fedit, flora-na, fedex, flora

``split``: FLoRA-NA with ``na_split = balanced`` and ``= fedit-scale`` on both bundled classification datasets
(minilm, Dirichlet 0.5, 3 clients) at the replication budget of ``benchmarks/paper_claims.py`` (short runs, so
that several seeds fit), every seed on the identical partition for both splits. The product B̂Â, and so the
round's global model, is the same for both splits; what differs is how the next round's local training moves
from it, so the comparison is of final accuracies. The default of ``method.na_split`` is the one with the
higher mean global accuracy (ties: personalized accuracy).

``table``: the default demo configuration (``fedlora run`` without a config file: minilm, rotten-tomatoes,
2,400 examples, 3 clients Dirichlet 0.5, LoRA r=8 on q/v, 8 rounds × 10 local steps) with fedit, flora-na,
fedex and flora, plus flora-na with the other split and flora with heterogeneous client ranks (4, 8, 16):
``agg_error`` of every round and the final global and personalized accuracy. Every run is a ``fedlora compare`` grid into ``--out``, so the command
is resumable: run it again and finished runs are reused.
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
from fedlora.results import RunResult, find_runs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from paper_claims import BUDGET  # noqa: E402  (the replication's per-run budget)

SPLITS = ("balanced", "fedit-scale")
DATASETS = ("rotten-tomatoes", "bbc-news")
TABLE_METHODS = ("fedit", "flora-na", "fedex", "flora")
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


def table(args: argparse.Namespace) -> str:
    rows: list[tuple[str, Path]] = []
    cfg = config.load(None, args.overrides)
    where = Path(args.out) / "table"
    compare(cfg, list(TABLE_METHODS), ["lora"], args.seeds, where, progress=not args.quiet)
    rows += [(r.method, r.path) for r in _runs(where)]
    split_dir = Path(args.out) / "table-fedit-scale"
    cfg = config.load(None, ["method.na_split=fedit-scale", *args.overrides])
    compare(cfg, ["flora-na"], ["lora"], args.seeds, split_dir, progress=not args.quiet)
    rows += [("flora-na (na_split fedit-scale)", r.path) for r in _runs(split_dir)]
    hetero = Path(args.out) / "table-hetero"
    cfg = config.load(None, ["method.name=flora", f"adapter.rank={HETERO_RANKS}", *args.overrides])
    compare(cfg, ["flora"], ["lora"], args.seeds, hetero, progress=not args.quiet)
    rows += [(f"flora, ranks {HETERO_RANKS}", r.path) for r in _runs(hetero)]
    order = {m: i for i, m in enumerate(TABLE_METHODS)}
    rows.sort(key=lambda x: (order.get(x[0].split(" ")[0].rstrip(","), len(order)), x[0], str(x[1])))
    rounds = max(len(find_runs([p])[0][0].records) for _, p in rows) - 1
    head = "| method | seed | " + " | ".join(f"agg_error r{t}" for t in range(1, rounds + 1)) \
        + " | global acc % | personalized acc % (mean / weighted) | MiB up / down |"
    lines = [head, "|" + "---|" * (rounds + 5)]
    for label, path in rows:
        run = find_runs([path])[0][0]
        errs = {x["round"]: x.get("agg_error") for x in run.records}
        cells = [f"{errs[t]:.1e}" if errs.get(t) is not None else "–" for t in range(1, rounds + 1)]
        s = run.summary
        lines.append(f"| {label} | {run.seed} | " + " | ".join(cells)
                     + f" | {100 * s['acc_global']:.1f} | {100 * s['acc_personal_mean']:.1f} / "
                     f"{100 * s['acc_personal_weighted']:.1f} | {s['bytes_up_total'] / 2**20:.2f} / "
                     f"{s['bytes_down_total'] / 2**20:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("split", "table"))
    ap.add_argument("--out", default="runs/demo_aggregation", help="where the runs go (resumable)")
    ap.add_argument("--seeds", default=None, help="default: 0,1,2 for split, 0 for table")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    args.seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.what == "split" else "0")).split(",")]
    text = split(args) if args.what == "split" else table(args)
    print(text)
    report = Path(args.out) / f"{args.what}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text + "\n", encoding="utf-8")
    print(f"written to {report}")


if __name__ == "__main__":
    main()
