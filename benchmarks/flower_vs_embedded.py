"""Seconds per round and bytes per round: a Flower deployment on loopback vs the embedded runtime, same config.

    python benchmarks/flower_vs_embedded.py                      # demo config (minilm, 3 clients), 2 rounds
    python benchmarks/flower_vs_embedded.py --rounds 10 --max-examples 0   # the full default demo (slow on CPU)
    python benchmarks/flower_vs_embedded.py --stock --cold       # also Flower's stock SuperNode, and its defaults

Both runs use the same config and seed; the Flower one is ``runtime.kind = "flower"`` through
:func:`fedlora.runtime.flower_launch.run_local` (SuperLink + 3 SuperNodes on 127.0.0.1, warm executors,
SuperNode idle wait capped at 0.2 s). ``--stock`` adds a run with Flower's own SuperNode (3-s idle wait),
``--cold`` one with Flower's defaults throughout (a fresh ClientApp process per message).
Seconds per round are the loop's own ``seconds`` field in metrics.jsonl (from the start of a round's training
to the end of its evaluation), so process start-up and model loading are reported apart, as "start-up".
Bytes: ``bytes_up`` / ``bytes_down`` in metrics.jsonl count the tensors in each message; the Flower run also
logs each message's serialised size (flower/rounds.jsonl) and Flower's own per-run accounting (``flwr ls``).
The three must agree up to framing, which this script shows per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from fedlora import config as cfgmod  # noqa: E402
from fedlora.report import RunDir  # noqa: E402


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def close(a: object, b: object, tol: float = 1e-6) -> bool:
    """Equal up to ``tol`` (numbers), key by key (dicts); the nodes may use other thread counts than the
    embedded run, which changes float sums in the last bits."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= tol
    return a == b


def latency(run: Path) -> dict:
    """Per message kind: mean round trip seen by the ServerApp, mean time inside the ClientApp (its
    ``timing`` record) and their difference: what Flower adds (polling, process start-up, transfer)."""
    ups = [json.loads(line) for line in (run / "flower" / "messages.jsonl").read_text().splitlines()]
    out = {}
    for kind in ("train", "evaluate"):
        rows = [m for m in ups if m["dir"] == "up" and m["kind"] == kind and "compute_s" in m and m["round"] > 0]
        if rows:
            rtt = statistics.mean(m["rtt_s"] for m in rows)
            compute = statistics.mean(m["compute_s"] for m in rows)
            out[kind] = {"messages": len(rows), "round_trip_s": rtt, "clientapp_s": compute,
                         "overhead_s": rtt - compute}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-examples", type=int, default=1500,
                   help="stratified subsample of the dataset (0: all 13,905; evaluation then dominates)")
    p.add_argument("--method", default="fedsa")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="more section.key=value")
    p.add_argument("--stock", action="store_true",
                   help="also run with Flower's own SuperNode (3-s idle wait) next to the warm executor")
    p.add_argument("--cold", action="store_true",
                   help="also run Flower's defaults: stock SuperNode, a new ClientApp process per message")
    p.add_argument("--out", default="runs/bench-flower")
    p.add_argument("--timeout", type=float, default=900, help="bound on each Flower run (s)")
    args = p.parse_args()

    from fedlora.runtime import simulation
    from fedlora.runtime.flower_launch import run_local

    overrides = [f"train.rounds={args.rounds}", f"data.max_examples={args.max_examples}",
                 f"method.name={args.method}", *args.overrides]
    cfg = cfgmod.load(None, overrides)
    out = Path(args.out)
    runs = {"embedded": out / "embedded", "flower": out / "flower"}
    if args.stock:
        runs["flower-stock"] = out / "flower-stock"
    if args.cold:
        runs["flower-cold"] = out / "flower-cold"
    walls: dict[str, float] = {}
    summaries: dict[str, dict] = {}
    for name, path in runs.items():
        t0 = time.perf_counter()
        if name == "embedded":
            summaries[name] = simulation.run(cfg, RunDir(path, overwrite=True), progress=False)
        else:
            summaries[name] = run_local(cfg, RunDir(path, overwrite=True), progress=False, timeout=args.timeout,
                                        warm=name != "flower-cold", fast_poll=name == "flower")
        walls[name] = time.perf_counter() - t0
        print(f"{name}: {walls[name]:.0f} s wall", flush=True)

    recs = {name: records(path) for name, path in runs.items()}
    per_round = {name: [r["seconds"] for r in rs if r["round"] > 0] for name, rs in recs.items()}
    mean = {name: statistics.mean(v) for name, v in per_round.items()}
    startup = {name: walls[name] - sum(r["seconds"] for r in recs[name]) for name in runs}
    result: dict = {"config": overrides, "cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg(),
                    "seconds_per_round": per_round, "mean_seconds_per_round": mean,
                    "round0_seconds": {n: rs[0]["seconds"] for n, rs in recs.items()},
                    "startup_seconds": startup, "wall_seconds": walls,
                    "ratio_flower_over_embedded": mean["flower"] / mean["embedded"]}
    for name in ("flower-stock", "flower-cold"):
        if name in mean:
            result[f"ratio_{name}_over_embedded"] = mean[name] / mean["embedded"]

    wire = [json.loads(line) for line in (runs["flower"] / "flower" / "rounds.jsonl").read_text().splitlines()]
    traffic = summaries["flower"].get("flower_network_traffic") or {}
    result["bytes"] = {
        "per_round": [{k: w[k] for k in ("round", "bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down")}
                      for w in wire],
        "metrics_total": {"up": summaries["flower"]["bytes_up_total"], "down": summaries["flower"]["bytes_down_total"]},
        "wire_total_rounds": {"up": sum(w["wire_bytes_up"] for w in wire),
                              "down": sum(w["wire_bytes_down"] for w in wire)},
        "flower_accounting": traffic,
    }
    result["latency"] = {name: latency(runs[name]) for name in runs if name != "embedded"}
    same = all(close(recs["embedded"][i][k], recs["flower"][i][k]) for i in range(len(recs["embedded"]))
               for k in ("train_loss", "clients", "acc_personal_mean", "bytes_up", "bytes_down"))
    result["same_metrics_as_embedded"] = same
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nconfig: {' '.join(overrides)}  ({result['cpus']} CPUs, load average {result['load_avg'][0]:.1f})")
    print("| runtime | start-up (s) | round 0 (s) | mean s/round (rounds 1..) | per round |")
    print("|---|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {startup[name]:.0f} | {result['round0_seconds'][name]:.1f} | {mean[name]:.1f} | "
              f"{', '.join(f'{s:.1f}' for s in per_round[name])} |")
    print(f"\nratio Flower / embedded (mean s/round): {result['ratio_flower_over_embedded']:.2f}"
          + "".join(f"; {n} / embedded: {result[f'ratio_{n}_over_embedded']:.2f}"
                    for n in ("flower-stock", "flower-cold") if n in mean))
    print("\n| round | metrics bytes_up | wire bytes up | metrics bytes_down | wire bytes down |")
    print("|---|---|---|---|---|")
    for w in wire:
        print(f"| {w['round']} | {w['bytes_up']:,} | {w['wire_bytes_up']:,} | {w['bytes_down']:,} | "
              f"{w['wire_bytes_down']:,} |")
    print("\n| runtime | message | round trip (s) | inside the ClientApp (s) | added by Flower (s) |")
    print("|---|---|---|---|---|")
    for name, kinds in result["latency"].items():
        for kind, v in kinds.items():
            print(f"| {name} | {kind} | {v['round_trip_s']:.1f} | {v['clientapp_s']:.1f} | {v['overhead_s']:.1f} |")
    b = result["bytes"]
    print(f"\nrun totals: metrics.jsonl up {b['metrics_total']['up']:,} / down {b['metrics_total']['down']:,}; "
          f"serialised messages (rounds) up {b['wire_total_rounds']['up']:,} / "
          f"down {b['wire_total_rounds']['down']:,}; "
          f"Flower's accounting (whole run, incl. start-up queries) inbound {traffic.get('inbound-bytes', 0):,} / "
          f"outbound {traffic.get('outbound-bytes', 0):,}")
    print(f"same metrics as embedded (1e-6): {same}; results: {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
