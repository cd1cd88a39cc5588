"""Why FLoRA-NA's split of B̂Â matters: A's scale and the local gradients per round, every ``method.na_split``
beside FlexLoRA, at the replication's bbc-news SGD budget (issue 27, part 1).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/na_split.py [--lr 0.2] [--seeds 0] [--val-seeds 100] [--splits ...]
        [--only validation|test] [--table]

Each variant runs twice, by the replication's protocol (benchmarks/replication.py): a *validation* run
(``data.validation_fraction = 0.25``, seed ``TUNE_SEED``; its accuracies are on the clients' validation splits and
choose the default; ``--val-seeds`` adds more) and a *test* run at each of ``--seeds`` (the full training sets;
the global test set, never used to choose). Every run pins ``train.dtype = float32``, ``train.threads = 1`` and evaluates every round.

Recorded per round (observers in this script only; the training loop is untouched):
- the broadcast's A (mean over layers of ‖A‖_F and of A's mean row norm) and B (mean over layers of ‖B‖_F);
- the gradient norms of A and of B in local training: at every optimizer step the norm over all A (resp. B)
  tensors of the model, a mean over the round's steps per client, then a mean over clients (taken just before
  ``optimizer.step``, by a global step pre-hook, with no clipping in this budget);
- the round record's accuracies (``acc_global``, ``acc_personal_mean``).
One JSON line per run is appended to ``benchmarks/results/na_split.jsonl`` when the run ends; a run already there
is skipped, so an interrupted measurement resumes. ``--table`` prints the Markdown tables from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replication as rep  # noqa: E402  (the budget, TUNE_SEED and the tuning overrides)

RESULTS = Path(__file__).resolve().parent / "results" / "na_split.jsonl"
SPLITS = ("balanced", "fedit-scale", "orthonormal-a", "a-row-norm")
PINNED = ("train.dtype=float32", "train.threads=1", "train.eval_every=1", "data.dataset=bbc-news",
          "train.optimizer=sgd", "adapter.kind=lora")


def variants(splits: list[str], flexlora: bool = True) -> list[tuple[str, list[str]]]:
    """(name, overrides): FLoRA-NA with each split, then FlexLoRA (the same optimal product, σ on B)."""
    out = [(f"flora-na/{s}", ["method.name=flora-na", f"method.na_split={s}"]) for s in splits]
    return out + ([("flexlora", ["method.name=flexlora"])] if flexlora else [])


def _norms(payload: dict[str, Any]) -> dict[str, float]:
    import torch

    a_keys = sorted(k for k in payload if "lora_A" in k)
    b_keys = sorted(k for k in payload if "lora_B" in k)
    fro = [float(torch.linalg.matrix_norm(payload[k].double())) for k in a_keys]
    rows = [float(torch.linalg.vector_norm(payload[k].double(), dim=1).mean()) for k in a_keys]
    b_fro = [float(torch.linalg.matrix_norm(payload[k].double())) for k in b_keys]
    return {"a_fro": sum(fro) / len(fro), "a_row": sum(rows) / len(rows), "b_fro": sum(b_fro) / len(b_fro)}


def measure(sets: list[str], seed: int) -> dict[str, Any]:
    """One run with its observers; returns the per-round measurements and the run's cost."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fedlora import config
    from fedlora.compare import seed_overrides
    from fedlora.experiment import build
    from fedlora.report import RunDir
    from fedlora.runtime.simulation import run

    seeded = [f"{section}.seed={seed}" for section in seed_overrides(seed)]
    cfg = config.load(None, [*sets, *seeded]).resolved()
    exp = build(cfg)
    a_params = {id(p) for k, p in exp.slots.items() if "lora_A" in k}
    b_params = {id(p) for k, p in exp.slots.items() if "lora_B" in k}
    rounds: dict[int, dict[str, Any]] = {0: _norms(dict(exp.init_state))}
    current: dict[str, Any] = {"round": 0, "client": -1}
    steps: dict[tuple[int, int], list[tuple[float, float]]] = {}

    def pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        sq = {"A": 0.0, "B": 0.0}
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None and (id(p) in a_params or id(p) in b_params):
                    sq["A" if id(p) in a_params else "B"] += float(p.grad.double().pow(2).sum())
        steps.setdefault((current["round"], current["client"]), []).append((math.sqrt(sq["A"]), math.sqrt(sq["B"])))

    train = exp.trainer.train

    def observed_train(state: Any, data: Any, round_: int, *a: Any, **kw: Any) -> Any:
        current.update(round=round_, client=data.client_id)
        return train(state, data, round_, *a, **kw)

    aggregate = exp.method.aggregate

    def observed_aggregate(uploads: Any, global_state: Any) -> Any:
        broadcast = aggregate(uploads, global_state)
        rounds[current["round"]] = _norms({**global_state, **broadcast.payload})
        return broadcast

    exp.trainer.train = observed_train
    exp.method.aggregate = observed_aggregate
    handle = register_optimizer_step_pre_hook(pre_step)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        with tempfile.TemporaryDirectory(prefix="na-split-") as tmp:
            run(cfg, RunDir(Path(tmp) / "run"), progress=False, exp=exp)
            records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    finally:
        handle.remove()
    for (r, _), per_step in sorted(steps.items()):
        grads = rounds.setdefault(r, {}).setdefault("_grads", [])
        grads.append((sum(g for g, _ in per_step) / len(per_step), sum(g for _, g in per_step) / len(per_step)))
    for r, row in rounds.items():
        grads = row.pop("_grads", [])
        if grads:
            row["grad_a"] = sum(g for g, _ in grads) / len(grads)
            row["grad_b"] = sum(g for _, g in grads) / len(grads)
    for rec in records:
        rounds.setdefault(int(rec["round"]), {}).update(
            {k: rec.get(k) for k in ("acc_global", "acc_personal_mean", "agg_error")})
    return {"rounds": [{"round": r, **rounds[r]} for r in sorted(rounds)],
            "wall_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


def done() -> set[tuple[str, str, int, float]]:
    if not RESULTS.is_file():
        return set()
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {(r["variant"], r["split"], r["seed"], r["lr"]) for r in rows}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def tables() -> str:
    """Markdown: per round, each variant's A / B norms and gradients (mean over its test runs' seeds), then every
    run's final accuracies and the pick of the replication's rule (best final mean validation accuracy over
    clients at TUNE_SEED; the mean over every validation seed beside it)."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    names = list(dict.fromkeys(r["variant"] for r in rows))

    def f(v: float | None, fmt: str, scale: float = 1.0) -> str:
        return "" if v is None else format(scale * v, fmt)

    out = ["| variant | round | ‖A‖_F | A row norm | ‖B‖_F | ‖∇A‖ | ‖∇B‖ | test acc_global % |",
           "|---|---|---|---|---|---|---|---|"]
    for name in names:
        test = [r for r in rows if r["variant"] == name and r["split"] == "test"]
        for i in range(max((len(r["rounds"]) for r in test), default=0)):
            cell = {k: _mean([r["rounds"][i].get(k) for r in test if i < len(r["rounds"])])
                    for k in ("a_fro", "a_row", "b_fro", "grad_a", "grad_b", "acc_global")}
            out.append(f"| {name} | {i} | {f(cell['a_fro'], '.3f')} | {f(cell['a_row'], '.3f')} "
                       f"| {f(cell['b_fro'], '.4f')} | {f(cell['grad_a'], '.4f')} | {f(cell['grad_b'], '.4f')} "
                       f"| {f(cell['acc_global'], '.1f', 100)} |")
    val_seeds = sorted({r["seed"] for r in rows if r["split"] == "validation"})
    test_seeds = sorted({r["seed"] for r in rows if r["split"] == "test"})

    def final(name: str, kind: str, seed: int, key: str) -> float | None:
        hit = [r for r in rows if (r["variant"], r["split"], r["seed"]) == (name, kind, seed)]
        return hit[-1]["rounds"][-1].get(key) if hit else None

    out += ["", "| variant | " + " | ".join(f"val s{s} (personal / global)" for s in val_seeds)
            + " | val mean personal | " + " | ".join(f"test s{s} global" for s in test_seeds)
            + " | test mean global | CPU s / run |", "|---" * (len(val_seeds) + len(test_seeds) + 4) + "|"]
    pick: dict[str, float] = {}
    for name in names:
        val = [(final(name, "validation", s, "acc_personal_mean"), final(name, "validation", s, "acc_global"))
               for s in val_seeds]
        tst = [final(name, "test", s, "acc_global") for s in test_seeds]
        first = final(name, "validation", rep.TUNE_SEED, "acc_personal_mean")
        if first is not None:
            pick[name] = first
        cost = _mean([r["cpu_seconds"] for r in rows if r["variant"] == name])
        out.append(f"| {name} | " + " | ".join(f"{f(p, '.1f', 100)} / {f(g, '.1f', 100)}" for p, g in val)
                   + f" | {f(_mean([p for p, _ in val]), '.1f', 100)} | "
                   + " | ".join(f(t, ".1f", 100) for t in tst)
                   + f" | {f(_mean(tst), '.1f', 100)} | {f(cost, '.0f')} |")
    splits = {n: v for n, v in pick.items() if n.startswith("flora-na/")}
    if splits:
        best = max(splits.values())
        out += ["", f"The replication's rule (final mean validation accuracy over clients, seed {rep.TUNE_SEED}) picks: "
                + ", ".join(n for n, v in splits.items() if v == best) + f" ({100 * best:.1f} %)."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, default=0.2, help="SGD learning rate (the replication's tuned 10× reference)")
    ap.add_argument("--seeds", default="0", help="test-run seeds, comma-separated")
    ap.add_argument("--val-seeds", default=str(rep.TUNE_SEED),
                    help="validation-run seeds, comma-separated (the replication's rule: its TUNE_SEED alone)")
    ap.add_argument("--splits", default=",".join(SPLITS), help="FLoRA-NA splits to run")
    ap.add_argument("--no-flexlora", action="store_true",
                    help="leave FlexLoRA out (its factors are orthonormal-a's: tests/test_na_split.py)")
    ap.add_argument("--only", choices=("validation", "test"), help="run only one kind of run")
    ap.add_argument("--table", action="store_true", help="print the tables of the results file and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(tables())
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = [("validation", int(s), list(rep.TUNING)) for s in args.val_seeds.split(",")] + \
        [("test", s, []) for s in seeds]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for kind, seed, extra in kinds:
        if args.only and kind != args.only:
            continue
        for name, over in variants(args.splits.split(","), not args.no_flexlora):
            if (name, kind, seed, args.lr) in done():
                print(f"skip {name} {kind} s{seed} (in {RESULTS.name})", flush=True)
                continue
            sets = [*rep.budget("bbc-news", quick=False), *PINNED, f"train.lr={args.lr:g}", *over, *extra]
            result = measure(sets, seed)
            row = {"variant": name, "split": kind, "seed": seed, "lr": args.lr, "overrides": sets, **result}
            with open(RESULTS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            last = result["rounds"][-1]
            print(f"{name:24s} {kind:10s} s{seed}: acc_global {last.get('acc_global')} "
                  f"({result['cpu_seconds']:.0f} s CPU)", flush=True)


if __name__ == "__main__":
    main()
