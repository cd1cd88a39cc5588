"""Privacy-utility curves: accuracy against ε for client-level DP (DP-FedAvg, ``privacy.dp = "central"``) on
bbc-news (5 classes, all 2,225 articles, first 32 tokens) with MiniLM, 50 clients of which 10 are expected per round (Poisson, q = 0.2), and the cost of
DP-SGD in seconds per round.

    .venv/bin/python benchmarks/privacy.py [--methods fedit ffa] [--eps inf 16 4 1] [--seeds 0 1 2]
                                          [--rounds 5] [--out benchmarks/results/privacy.jsonl] [--cost]
                                          [--workers 2]

For each (seed, ε, method) one embedded run: ``eps = off`` is the non-private run (no clipping, same Poisson
sampling is *not* used: fixed-size sampling as without DP), ``inf`` clips with no noise (ε unbounded: what the
clipping and the fixed-denominator estimator alone cost), a number calibrates ``privacy.noise_multiplier`` to
that ε at δ = 1e-5 after ``--rounds`` rounds (Opacus's RDP accountant, ``privacy.target_epsilon``). The ε
written is the one the run's own accountant recorded in its last round. Every result is appended to ``--out``
as soon as it exists and a rerun skips what is there, so the script can be stopped and resumed (run it in the
background: ``nohup .venv/bin/python benchmarks/privacy.py > /tmp/privacy.log 2>&1 &``).

``--cost`` measures the seconds of one client's local training without and with ``privacy.dp_sgd`` and of one
aggregation without and with DP-FedAvg, alternating the variants so that a shared machine's load hits both
alike (medians, appended with ``"kind": "cost"``).

``--secagg-cost`` measures seconds per round on the Flower runtime (SuperLink and SuperNodes on 127.0.0.1, as
``fedlora run`` with ``runtime.kind = "flower"`` starts them) without and with ``privacy.secure_aggregation``:
the same federation (``SECAGG_COST``: MiniLM, bbc-news, every client in every round), plain and secure runs
alternating ``--repeats`` times; each round's ``seconds`` (training, aggregation, and evaluation in the last
round) and bytes, appended with ``"kind": "secagg-flower"``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

COMMON = ["model.name=minilm", "data.dataset=bbc-news", "data.max_examples=0", "data.num_clients=50",
          "data.partition=dirichlet", "data.alpha=1.0", "data.min_examples_per_client=10",
          "train.clients_per_round=10", "train.local_steps=4", "train.batch_size=16", "train.max_length=32",
          "train.eval_initial=false", "train.threads=1", "method.weighting=uniform", "adapter.rank=8",
          "privacy.delta=1e-5"]
CLIP = 1.0
# The federation of --secagg-cost: every client trains every round, so each round runs SecAgg+ over all of them.
SECAGG_COST = ["model.name=minilm", "data.dataset=bbc-news", "data.max_examples=0", "data.num_clients=4",
               "train.clients_per_round=4", "train.local_steps=4", "train.batch_size=16", "train.max_length=32",
               "train.eval_initial=false", "train.threads=1", "method.name=fedit", "adapter.rank=8",
               "runtime.kind=flower"]


def overrides(method: str, eps: str, seed: int, rounds: int) -> list[str]:
    out = COMMON + [f"method.name={method}", f"train.seed={seed}", f"train.rounds={rounds}",
                    f"train.eval_every={rounds}"]
    if eps == "off":
        return out
    out += ["privacy.dp=central", f"privacy.clip_norm={CLIP}", f"privacy.noise_seed={seed}"]
    if eps == "inf":
        return out + ["privacy.noise_multiplier=0.0"]
    return out + [f"privacy.target_epsilon={float(eps)}"]


def done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def run_one(sets: list[str]) -> dict[str, Any]:
    from fedlora import config
    from fedlora.runtime.simulation import run

    cfg = config.load(None, sets)
    t0, c0 = time.perf_counter(), time.process_time()
    s = run(cfg, progress=False)
    resolved = cfg.resolved()
    return {"acc_global": s.get("acc_global"), "acc_personal_mean": s.get("acc_personal_mean"),
            "epsilon": s.get("epsilon"), "noise_multiplier": resolved.privacy.noise_multiplier
            if resolved.privacy.dp != "off" else None, "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "seconds_per_round": s["wall_seconds"] / max(s["rounds"], 1), "rounds": s["rounds"],
            "failed_rounds": s["failed_rounds"]}


def table(path: Path) -> str:
    """Markdown tables of what ``path`` holds: accuracy per method and target ε (mean ± std over seeds), the ε
    the runs' accountant recorded, the calibrated noise multiplier; then the cost rows."""
    import statistics

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    out = ["| method | target ε | ε recorded (δ = 1e-5) | noise multiplier | global acc | personalized acc | seeds "
           "| s/round |", "|---|---|---|---|---|---|---|---|"]
    order = {"off": 0, "inf": 1, "16": 2, "4": 3, "1": 4}
    curve = [r for r in rows if r["kind"] == "curve"]
    for method, eps in sorted({(r["method"], r["eps_target"]) for r in curve}, key=lambda x: (x[0], order[x[1]])):
        rs = [r for r in curve if r["method"] == method and r["eps_target"] == eps]

        def ms(key: str) -> str:
            v = [r[key] for r in rs if r[key] is not None]
            if not v:
                return "–"
            return f"{100 * statistics.mean(v):.1f}" + (f" ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else "")

        eps_rec, z = rs[0]["epsilon"], rs[0]["noise_multiplier"]
        label = {"off": "no DP", "inf": "∞ (clip only)"}.get(eps, eps)
        recorded = "–" if eps == "off" else ("∞" if eps_rec is None else f"{eps_rec:.2f}")
        noise = "–" if z is None else f"{z:.3f}"
        seconds = statistics.mean(r["seconds_per_round"] for r in rs)
        out.append(f"| {method} | {label} | {recorded} | {noise} | {ms('acc_global')} | {ms('acc_personal_mean')} | "
                   f"{len(rs)} | {seconds:.0f} |")
    out += ffa_claim(curve, order)
    for r in (r for r in rows if r["kind"] == "secagg"):
        out += ["", "| one aggregation, in process | seconds |", "|---|---|",
                f"| plain weighted mean of {r['clients']} FedIT uploads ({r['entries_per_upload']:,} entries each) | "
                f"{r['plain_seconds']:.3f} |",
                f"| SecAgg+ (Flower's workflow and mod, 5 shares, threshold 3) | {r['secaggplus_seconds']:.1f} |"]
    for r in (r for r in rows if r["kind"] == "secagg-flower"):
        p, s = "plain_", "secure_"
        out += ["", f"| Flower runtime, {r['clients']} clients, median over rounds × {r['repeats']} alternating runs "
                "| without SecAgg+ | with SecAgg+ | ratio |", "|---|---|---|---|"]
        for label, key, fmt in (("seconds per round (train + aggregate)", "train_round_seconds", "{:.1f}"),
                                ("seconds of the last round (+ evaluation)", "eval_round_seconds", "{:.1f}"),
                                ("bytes_up per round (the record's)", "bytes_up", "{:,.0f}"),
                                ("serialised bytes up per round (message log)", "wire_bytes_up", "{:,.0f}"),
                                ("serialised bytes down per round (message log)", "wire_bytes_down", "{:,.0f}")):
            out.append(f"| {label} | {fmt.format(r[p + key])} | {fmt.format(r[s + key])} | "
                       f"{r[s + key] / r[p + key]:.2f} |")
        if r.get("within_run_ratio"):
            out.append(f"| within the secure runs: SecAgg+ stages per round, and round / (round − them) | – | "
                       f"{r['secure_secagg_seconds']:.1f} s | {r['within_run_ratio']:.2f} |")
    for r in (r for r in rows if r["kind"] == "cost"):
        out += ["", f"| cost (median of {r['repeats']}, alternating) | seconds | with privacy | ratio |",
                "|---|---|---|---|",
                f"| one client's local training ({r['local_steps']} steps of {r['batch_size']}), plain vs DP-SGD | "
                f"{r['train_seconds']:.2f} | {r['train_dp_sgd_seconds']:.2f} | "
                f"{r['train_dp_sgd_seconds'] / r['train_seconds']:.2f} |",
                f"| one FedIT aggregation of {r['uploads_aggregated']} uploads, plain vs DP-FedAvg | "
                f"{r['aggregate_seconds']:.4f} | {r['aggregate_central_dp_seconds']:.4f} | "
                f"{r['aggregate_central_dp_seconds'] / r['aggregate_seconds']:.2f} |"]
    return "\n".join(out)


def ffa_claim(curve: list[dict[str, Any]], order: dict[str, int]) -> list[str]:
    """FFA-LoRA's claim (Sun et al. 2024: it suffers less from DP noise than FedIT), judged per ε as the replication
    judges a claim (benchmarks/claims_check.py): FFA-LoRA − FedIT global accuracy paired by seed, a 95% t interval,
    *holds* when it excludes 0 upwards, *does not hold* downwards, *inconclusive* otherwise."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import claims_check as cc  # noqa: PLC0415

    def acc(method: str, eps: str) -> dict[int, float]:
        return {r["seed"]: r["acc_global"] for r in curve
                if r["method"] == method and r["eps_target"] == eps and r["acc_global"] is not None}

    def drop(method: str, eps: str) -> dict[int, float]:  # accuracy lost to DP, per seed
        plain, private = acc(method, "off"), acc(method, eps)
        return {seed: plain[seed] - private[seed] for seed in plain.keys() & private.keys()}

    out = ["", "| target ε | FFA-LoRA global acc | FedIT global acc | FFA-LoRA − FedIT, 95% CI | FFA-LoRA higher? "
           "| FedIT's drop − FFA-LoRA's drop (from no DP), 95% CI | FFA-LoRA loses less? |",
           "|---|---|---|---|---|---|---|"]
    for eps in sorted({r["eps_target"] for r in curve}, key=lambda e: order[e]):
        p = cc.paired(acc("ffa", eps), acc("fedit", eps))
        if p is None:
            continue
        label = {"off": "no DP", "inf": "∞ (clip only)"}.get(eps, eps)
        d = cc.paired(drop("fedit", eps), drop("ffa", eps)) if eps != "off" else None
        less = f"{cc.interval(d)} | **{cc.verdict(d)}**" if d is not None else "– | –"
        out.append(f"| {label} | {100 * p.left:.1f} | {100 * p.right:.1f} | {cc.interval(p)} | **{cc.verdict(p)}** | "
                   f"{less} |")
    return out


def plot(path: Path, png: Path) -> None:
    """Accuracy against ε (log scale; "∞" = clipping only, "no DP" = the plain run, at the right), one line per
    method: the global model's accuracy, or the personalized mean for methods without one (FedSA-LoRA); each seed
    a dot, the mean a line."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curve = [r for r in rows if r["kind"] == "curve"]
    xs = {"1": 1.0, "4": 4.0, "16": 16.0, "inf": 64.0, "off": 256.0}  # ∞ and no DP drawn past 16
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, method in enumerate(sorted({r["method"] for r in curve})):
        colour = matplotlib.colormaps["tab10"].colors[i]
        points: dict[str, list[float]] = {}
        for r in (r for r in curve if r["method"] == method):
            acc = r["acc_global"] if r["acc_global"] is not None else r["acc_personal_mean"]
            if acc is not None:
                points.setdefault(r["eps_target"], []).append(100 * acc)
        keys = sorted(points, key=lambda e: xs[e])
        for e in keys:
            ax.scatter([xs[e]] * len(points[e]), points[e], color=colour, s=12, alpha=0.6)
        label = method + (" (personalized)" if all(r["acc_global"] is None for r in curve if r["method"] == method)
                          else "")
        ax.plot([xs[e] for e in keys], [statistics.mean(points[e]) for e in keys], color=colour, marker="o",
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs.values()), ["1", "4", "16", "∞ (clip)", "no DP"])
    ax.axhline(20, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("ε (δ = 1e-5, central DP, 5 rounds)")
    ax.set_ylabel("accuracy after 5 rounds (%)")
    ax.set_title("bbc-news, MiniLM, 50 clients, 10 expected per round; dotted: chance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def cost(out: Path, repeats: int = 5) -> None:
    """Seconds of one client's local training (train.local_steps steps) without and with DP-SGD, and of one
    aggregation without and with DP-FedAvg's clipping and noise, alternating the two variants ``repeats`` times
    so that the load of a shared machine hits both alike; medians are appended to ``out``."""
    import statistics

    from fedlora import config
    from fedlora.experiment import build
    from fedlora.methods import Upload

    sets = COMMON + ["method.name=fedit", "train.rounds=5", "privacy.noise_seed=0"]
    plain = build(config.load(None, sets))
    sgd = build(config.load(None, sets + ["privacy.dp_sgd=true"]))
    central = build(config.load(None, sets + ["privacy.dp=central", "privacy.noise_multiplier=1.0"]))
    times: dict[str, list[float]] = {"train": [], "train_dp_sgd": [], "aggregate": [], "aggregate_central_dp": []}
    uploads = []
    for r in range(1, repeats + 1):
        for name, exp in (("train", plain), ("train_dp_sgd", sgd)):
            node = exp.client_node(exp.clients[0])
            t0 = time.perf_counter()
            up, _ = node.fit(r)
            times[name].append(time.perf_counter() - t0)
            if name == "train":
                uploads.append(Upload(len(uploads), up.payload, up.num_examples))
    for _ in range(repeats):
        for name, exp in (("aggregate", plain), ("aggregate_central_dp", central)):
            t0 = time.perf_counter()
            exp.method.aggregate(uploads, exp.init_state)
            times[name].append(time.perf_counter() - t0)
    result = {"key": f"cost/{time.strftime('%Y%m%d-%H%M%S')}", "kind": "cost", "repeats": repeats,
              "local_steps": plain.config.train.local_steps, "batch_size": plain.config.train.batch_size,
              "uploads_aggregated": len(uploads), **{f"{k}_seconds": statistics.median(v) for k, v in times.items()},
              "all_seconds": times, "sets": sets}
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("sets", "all_seconds")}), flush=True)


def secagg_cost(out: Path, clients: int = 10, repeats: int = 3) -> None:
    """Seconds of one SecAgg+ round (Flower's workflow and mod, in process: key agreement, secret sharing,
    masking, unmasking; no network) over ``clients`` FedIT uploads of the benchmark's model, against the plain
    weighted mean of the same uploads (``method.aggregate``)."""
    import statistics

    import numpy as np

    from fedlora import config
    from fedlora.experiment import build
    from fedlora.methods import Upload
    from fedlora.privacy.secagg import InProcessGrid, client_app, secure_mean

    exp = build(config.load(None, COMMON + ["method.name=fedit", "train.rounds=5"]))
    keys = list(exp.method.shared_keys())
    gen = np.random.default_rng(0)
    ups = {100 + c: ({k: (exp.init_state[k].numpy() + gen.normal(0, 0.01, exp.init_state[k].shape)).astype(np.float32)
                      for k in keys}, 1) for c in range(clients)}
    plain, secure = [], []
    for _ in range(repeats):
        uploads = [Upload(c, {k: torch_from(v) for k, v in p.items()}, w) for c, (p, w) in ups.items()]
        t0 = time.perf_counter()
        exp.method.aggregate(uploads, exp.init_state)
        plain.append(time.perf_counter() - t0)
        grid = InProcessGrid(client_app(lambda n: ups[n], keys), list(ups))
        t0 = time.perf_counter()
        secure_mean(grid, keys, {k: tuple(exp.init_state[k].shape) for k in keys}, num_shares=5, threshold=3,
                    max_weight=1.0)
        secure.append(time.perf_counter() - t0)
    result = {"key": f"secagg/{time.strftime('%Y%m%d-%H%M%S')}", "kind": "secagg", "clients": clients,
              "entries_per_upload": int(sum(ups[100][0][k].size for k in keys)), "plain_seconds": statistics.median(plain),
              "secaggplus_seconds": statistics.median(secure), "all": {"plain": plain, "secaggplus": secure}}
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


def secagg_flower_cost(out: Path, rounds: int = 3, repeats: int = 1) -> None:
    """Seconds per round of one federation on the Flower runtime (127.0.0.1) without and with secure aggregation,
    the two runs alternating ``repeats`` times (start-up, which both pay alike, is not in a round's seconds)."""
    import statistics
    import tempfile

    from fedlora import config
    from fedlora.report import RunDir
    from fedlora.runtime.flower_launch import run_local

    sets = SECAGG_COST + [f"train.rounds={rounds}", f"train.eval_every={rounds}"]
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "secure": []}
    for _ in range(repeats):
        for name, extra in (("secure", ["privacy.secure_aggregation=true"]), ("plain", [])):
            with tempfile.TemporaryDirectory(prefix="fedlora-secagg-cost-") as tmp:
                t0 = time.perf_counter()
                run_local(config.load(None, sets + extra), RunDir(Path(tmp) / "run"), progress=False, timeout=1800)
                wall = time.perf_counter() - t0
                records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
                wire = [json.loads(x) for x in (Path(tmp) / "run" / "flower" / "rounds.jsonl").read_text().splitlines()]
                log = [json.loads(x) for x in (Path(tmp) / "run" / "flower" / "messages.jsonl").read_text().splitlines()]
            rs = [r for r in records if r["round"] > 0]
            # the secure run's own split of each round: receipts (training included) and the SecAgg+ stages
            phases = {e["round"]: e for e in log if e.get("kind") == "secagg.round"}
            runs[name].append({"wall_seconds": wall, "seconds": [r["seconds"] for r in rs],
                               "secagg_seconds": [phases[r["round"]]["secagg_seconds"] for r in rs if r["round"] in phases],
                               "bytes_up": [r["bytes_up"] for r in rs], "acc_global": rs[-1]["acc_global"],
                               "wire_bytes_up": [w["wire_bytes_up"] for w in wire if w["round"] > 0],
                               "wire_bytes_down": [w["wire_bytes_down"] for w in wire if w["round"] > 0]})
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(runs[name][-1])}", flush=True)

    def median(name: str, key: str, last: bool) -> float:  # rounds without evaluation, or the evaluated last one
        return statistics.median(v for r in runs[name] for i, v in enumerate(r.get(key, [])) if (i == rounds - 1) == last)

    result = {"key": f"secagg-flower/{time.strftime('%Y%m%d-%H%M%S')}", "kind": "secagg-flower", "rounds": rounds,
              "repeats": repeats, "clients": 4, "sets": sets, "runs": runs,
              **{f"{name}_{what}": median(name, key, last) for name in runs
                 for what, key, last in (("train_round_seconds", "seconds", False),
                                         ("eval_round_seconds", "seconds", True),
                                         ("bytes_up", "bytes_up", False), ("wire_bytes_up", "wire_bytes_up", False),
                                         ("wire_bytes_down", "wire_bytes_down", False))}}
    # Within the secure runs (the same load on both parts): a round's seconds against the same round without its
    # SecAgg+ stages.
    within = [s / (s - a) for r in runs["secure"] for i, (s, a) in enumerate(zip(r["seconds"], r["secagg_seconds"]))
              if i != rounds - 1]
    result["secure_secagg_seconds"] = median("secure", "secagg_seconds", False)
    result["within_run_ratio"] = statistics.median(within) if within else None
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("sets", "runs")}), flush=True)


def torch_from(a: Any) -> Any:
    import torch

    return torch.from_numpy(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["fedit", "ffa", "fedsa", "fedsvd"])
    ap.add_argument("--eps", nargs="+", default=["off", "4", "inf", "1", "16"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy.jsonl"))
    ap.add_argument("--cost", action="store_true", help="measure seconds per round with and without dp_sgd")
    ap.add_argument("--table", action="store_true", help="print the results in --out as a markdown table")
    ap.add_argument("--plot", type=Path, help="draw the curves of --out into this PNG file")
    ap.add_argument("--secagg", action="store_true", help="time one SecAgg+ round against the plain mean")
    ap.add_argument("--secagg-cost", action="store_true",
                    help="seconds per round on the Flower runtime without and with privacy.secure_aggregation")
    ap.add_argument("--repeats", type=int, default=1, help="--secagg-cost: alternating plain/secure pairs")
    ap.add_argument("--workers", type=int, default=1, help="curves: runs in parallel (processes of 1 thread each)")
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
        return
    if args.plot:
        plot(args.out, args.plot)
        return
    import torch

    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    have = done(args.out)
    jobs: list[tuple[str, list[str], dict[str, Any]]] = []
    if args.cost:
        cost(args.out)
        return
    if args.secagg:
        secagg_cost(args.out)
        return
    if args.secagg_cost:
        secagg_flower_cost(args.out, args.rounds, args.repeats)
        return
    for seed in args.seeds:
        for eps in args.eps:
            for method in args.methods:
                jobs.append((f"curve/{method}/{eps}/{seed}/{args.rounds}", overrides(method, eps, seed, args.rounds),
                             {"kind": "curve", "method": method, "eps_target": eps, "seed": seed}))
    todo = [job for job in jobs if job[0] not in have]
    for key, sets, _ in todo:
        print(f"[{time.strftime('%H:%M:%S')}] {key}: fedlora run " + " ".join(f"--set {s}" for s in sets), flush=True)

    def keep(key: str, sets: list[str], info: dict[str, Any], numbers: dict[str, Any]) -> None:
        result = {"key": key, **info, **numbers, "sets": sets}
        with args.out.open("a") as f:  # as soon as it exists: an interrupted grid resumes from here
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "sets"}), flush=True)

    if args.workers <= 1:
        for key, sets, info in todo:
            keep(key, sets, info, run_one(sets))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(args.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {pool.submit(run_one, sets): (key, sets, info) for key, sets, info in todo}
        for done_run in as_completed(futures):
            keep(*futures[done_run], done_run.result())


if __name__ == "__main__":
    sys.exit(main())
