"""Accuracy parity of bf16 against float32 (issue 15), same config and seeds.

    .venv/bin/python benchmarks/bf16_parity.py runs [--model tiny-bert] [--methods fedsa,fedit,flora-na,fedex,flora]
                                                    [--set section.key=value ...] [--json out.json]
    .venv/bin/python benchmarks/bf16_parity.py batch [--json out.json]

With ``--json``, ``runs`` is resumable: each finished run is appended to ``out.json.parts.jsonl`` and skipped
when the same command is run again.

``runs``: the demo configuration (rotten-tomatoes, 2,400 examples, 3 clients Dirichlet 0.5, LoRA r = 8, 8 rounds
× 10 steps) for each method in float32 and in bf16 (``train.dtype``), seed 0: final global and personalized
accuracy, their difference against one binomial standard error of the test set, and ``agg_error`` of the
last round (the exact methods must stay at float32 rounding in bf16: adapters and aggregation are float32).
For the methods that merge into the base weights (FedEx, FLoRA) it also replays the run's merges into a bf16
copy of the base (what storing the base in bf16 would keep) and reports its drift from the float32 master
that fedlora keeps: ‖bf16-accumulated − master‖ / ‖Σ merges‖.

``batch``: minilm on one demo batch (16 × 64 tokens) at the initial adapter: the loss and the adapter gradient
in bf16 against float32 (relative loss difference, cosine of the gradients, relative gradient error).

On a CPU without bf16 units bf16 is emulated and about 100× slower than float32 (benchmarks/throughput.py),
so ``runs`` defaults to tiny-bert there; pass ``--model minilm`` on hardware with bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from fedlora import config  # noqa: E402
from fedlora.experiment import build  # noqa: E402
from fedlora.report import RunDir  # noqa: E402
from fedlora.runtime import simulation  # noqa: E402

DTYPES = ("float32", "bfloat16")


def dense(base_update: Any) -> dict[str, torch.Tensor]:
    """Every delta of a broadcast's base update as a dense matrix (a ``protocol.BaseUpdate``, or the older
    name-keyed dict with factored ``name@P`` / ``name@Q`` entries)."""
    if hasattr(base_update, "materialize"):
        return base_update.materialize()
    from fedlora.methods.base import materialize

    return materialize(base_update)


def one_run(overrides: list[str], dtype: str) -> dict[str, Any]:
    """One run; returns the last evaluated record's figures, the last agg_error and (FedEx, FLoRA) the bf16 drift."""
    exp = build(config.load(None, [*overrides, f"train.dtype={dtype}"]))
    params = dict(exp.model.named_parameters())
    merges: list[dict[str, torch.Tensor]] = []
    aggregate = exp.method.aggregate

    def recording(uploads, global_state):  # type: ignore[no-untyped-def]
        b = aggregate(uploads, global_state)
        if b.base_update:
            merges.append({k: v.detach().clone() for k, v in dense(b.base_update).items()})
        return b

    exp.method.aggregate = recording  # type: ignore[method-assign]
    w0 = {name: p.detach().clone() for name, p in params.items()}
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulation.run(exp.config, RunDir(Path(tmp) / "run"), progress=False, exp=exp)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    errors = [r.get("agg_error") for r in records if r.get("agg_error") is not None]
    out = {"acc_global": summary.get("acc_global"), "acc_personal_mean": summary.get("acc_personal_mean"),
           "acc_personal_weighted": summary.get("acc_personal_weighted"),
           "agg_error_last": errors[-1] if errors else None, "agg_error_max": max(errors) if errors else None,
           "test_examples": int(len(exp.split.global_test)), "wall_seconds": summary.get("wall_seconds"),
           "resolved_dtype": exp.config.train.dtype}
    if merges:
        total = {n: sum(m[n] for m in merges) for n in merges[0]}
        naive = {n: w0[n].to(torch.bfloat16) for n in total}
        for m in merges:  # what a base stored in bf16 would hold: every merge rounded into it
            for n, d in m.items():
                naive[n] += d.to(torch.bfloat16)
        # Against the bf16 start plus the exact sum: only what the merges lost, not W0's own rounding to bf16.
        num = sum(float((naive[n].float() - (w0[n].to(torch.bfloat16).float() + total[n])).square().sum())
                  for n in total)
        den = sum(float(total[n].square().sum()) for n in total)
        master = sum(float((params[n].detach().float() - (w0[n].float() + total[n])).square().sum()) for n in total)
        out["merges"] = len(merges)
        out["bf16_base_drift"] = math.sqrt(num / den)  # relative to the size of everything merged
        out["master_drift"] = math.sqrt(master / den)  # fedlora's float32 master: float32 rounding only
    return out


def runs(args: argparse.Namespace) -> dict[str, Any]:
    base = [f"model.name={args.model}", f"train.threads={args.threads}", *args.overrides]
    # Resumable: every finished run is appended to PARTS (beside --json) and not run again by a later invocation
    # with the same model and overrides.
    parts = Path(f"{args.json}.parts.jsonl") if args.json else None
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if parts is not None and parts.is_file():
        for line in parts.read_text().splitlines():
            entry = json.loads(line)
            if entry["overrides"] == base:
                done[(entry["method"], entry["dtype"])] = entry["result"]
    rows = []
    for method in args.methods.split(","):
        row: dict[str, Any] = {"method": method}
        for dt in DTYPES:
            if (method, dt) in done:
                row[dt] = done[(method, dt)]
                continue
            row[dt] = one_run([*base, f"method.name={method}"], dt)
            print(f"  {method} {dt}: {json.dumps(row[dt])}", flush=True)
            if parts is not None:
                with parts.open("a") as fh:
                    fh.write(json.dumps({"overrides": base, "method": method, "dtype": dt, "result": row[dt]}) + "\n")
        n = row["float32"]["test_examples"]
        for key in ("acc_global", "acc_personal_mean"):
            a, b = row["float32"][key], row["bfloat16"][key]
            if a is not None and b is not None:
                se = math.sqrt(max(a * (1 - a), 1e-12) / n)  # one binomial standard error of the test set
                row[f"{key}_diff"], row[f"{key}_se"] = b - a, se
        rows.append(row)
    return {"model": args.model, "overrides": base, "rows": rows}


def batch(args: argparse.Namespace) -> dict[str, Any]:
    """Loss and adapter gradient of one demo batch in bf16 against float32 (minilm, initial adapter)."""
    torch.set_num_threads(args.threads)
    got = {}
    for dt in DTYPES:
        exp = build(config.load(None, [f"train.dtype={dt}", f"train.threads={args.threads}"]))
        exp.trainer.load(exp.init_state)
        slots = {k: p for k, p in exp.slots.items()}
        for p in slots.values():
            p.requires_grad_(True)
        # LoRA's B starts at zero, so A's gradient is zero in both dtypes; B's and the head's carry the comparison.
        idx = exp.clients[0].train[:exp.config.train.batch_size]
        exp.model.eval()  # no dropout: the two dtypes see the same network
        with exp.trainer._autocast():
            loss = exp.task.loss(exp.model, exp.task.batch(idx, exp.device))
        loss.backward()
        got[dt] = (float(loss), torch.cat([p.grad.flatten() for p in slots.values() if p.grad is not None]))
    (l32, g32), (l16, g16) = got["float32"], got["bfloat16"]
    return {"loss_f32": l32, "loss_bf16": l16, "loss_rel_diff": abs(l16 - l32) / abs(l32),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)),
            "grad_rel_error": float((g16 - g32).norm() / g32.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("runs", "batch"))
    ap.add_argument("--model", default="tiny-bert")
    ap.add_argument("--methods", default="fedsa,fedit,flora-na,fedex,flora")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json")
    args = ap.parse_args()
    result = runs(args) if args.what == "runs" else batch(args)
    if args.what == "runs":
        print("\n| method | global acc f32 → bf16 (Δ, 1 SE) | personal acc f32 → bf16 | agg_error last f32 / bf16 "
              "| bf16-stored base drift / master drift |\n|---|---|---|---|---|")
        for r in result["rows"]:
            f, b = r["float32"], r["bfloat16"]
            glob = (f"{f['acc_global']:.1%} → {b['acc_global']:.1%} ({r['acc_global_diff']:+.1%}, "
                    f"{r['acc_global_se']:.1%})") if f["acc_global"] is not None else "—"
            pers = f"{f['acc_personal_mean']:.1%} → {b['acc_personal_mean']:.1%}"
            err = (f"{f['agg_error_last']:.2g} / {b['agg_error_last']:.2g}" if f["agg_error_last"] is not None
                   else "—")
            drift = f"{b['bf16_base_drift']:.2g} / {b['master_drift']:.2g}" if "bf16_base_drift" in b else "—"
            print(f"| {r['method']} | {glob} | {pers} | {err} | {drift} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
