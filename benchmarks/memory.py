"""Peak memory and seconds per round as the number of clients grows, at a fixed number of clients per round.

    .venv/bin/python benchmarks/memory.py [--clients 10 100 1000] [--models tiny-bert minilm]
        [--methods fedsa fedit] [--per-round 10] [--rounds 4] [--states auto|memory|disk]
        [--json benchmarks/results/memory.json]

Each (model, method, N) is a fresh child process (so that peaks do not mix), one CPU thread, on the same data (all
of rotten-tomatoes, IID over N clients), 10 clients per round, train.client_states = auto (memory at N = 10, where
every client takes part; on disk above) and train.eval_clients = the clients per round. The child reports:

* ``peak_rss_mib``: its VmHWM from /proc/self/status (the OS's peak resident set, whole process: model, data, states);
* ``s_round`` / ``cpu_s_round``: the median wall-clock and process-CPU seconds of the rounds without evaluation
  (rounds 1 … rounds-1; round ``rounds`` is evaluated) — training, aggregation and the state files of 10 clients;
* ``s_eval_round``: the evaluated last round (10 sampled clients' own test splits, and the global test set for
  methods with a global model; a client's test split shrinks as N grows, so this one is not a like-for-like ratio);
* ``build_s``: building the experiment (data, tokenization, partition, model).

Ratios are against N = the smallest of ``--clients`` for the same model and method, measured within one invocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import os, sys, json, time, statistics
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from fedlora import config
from fedlora.experiment import build
from fedlora.runtime import loop, simulation
model, method, n, per_round, rounds, states = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                               int(sys.argv[5]), sys.argv[6])
cfg = config.load(None, [f"model.name={model}", f"method.name={method}", f"data.num_clients={n}",
                         "data.dataset=rotten-tomatoes", "data.max_examples=0", "data.partition=iid", f"train.clients_per_round={per_round}",
                         f"train.eval_clients={per_round}", f"train.rounds={rounds}", f"train.eval_every={rounds}",
                         "train.local_steps=2", "train.batch_size=8", "train.max_length=64", "train.threads=1",
                         "train.eval_initial=false", "train.dtype=float32", f"train.client_states={states}"])
t0 = time.perf_counter()
exp = build(cfg)
build_s = time.perf_counter() - t0
cpu, wall = {}, {}
inner = loop.run_round
def timed(server, transport, config, round_, *a, **k):
    c0 = time.process_time()
    rec = inner(server, transport, config, round_, *a, **k)
    cpu[round_] = time.process_time() - c0
    wall[round_] = rec["seconds"]
    return rec
loop.run_round = timed
simulation.run(cfg, None, progress=False, exp=exp)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"model": model, "method": method, "clients": n, "peak_rss_mib": hwm / 1024,
                  "s_round": statistics.median(wall[r] for r in range(1, rounds)),
                  "cpu_s_round": statistics.median(cpu[r] for r in range(1, rounds)),
                  "s_eval_round": wall[rounds], "cpu": cpu, "wall": wall, "build_s": build_s, "states_on_disk": cfg.states_on_disk}))
"""


def child(model: str, method: str, n: int, per_round: int, rounds: int, states: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, method, str(n), str(per_round), str(rounds), states],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"child {model} {method} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--models", nargs="+", default=["tiny-bert", "minilm"])
    ap.add_argument("--methods", nargs="+", default=["fedsa", "fedit"])
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4, help="rounds 1 … rounds-1 are timed; the last is evaluated")
    ap.add_argument("--states", default="auto", choices=("auto", "memory", "disk"), help="train.client_states")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for method in args.methods:
            base = None
            for n in sorted(args.clients):
                r = child(model, method, n, args.per_round, args.rounds, args.states)
                base = base or r
                r["rss_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]
                r["cpu_ratio"] = r["cpu_s_round"] / base["cpu_s_round"]
                r["wall_ratio"] = r["s_round"] / base["s_round"]
                rows.append(r)
                print(f"{model:>9} {method:>6} N={n:>5}  peak RSS {r['peak_rss_mib']:7.0f} MiB ({r['rss_ratio']:.3f}x)  "
                      f"CPU s/round {r['cpu_s_round']:6.3f} ({r['cpu_ratio']:.3f}x)  wall s/round {r['s_round']:6.3f} "
                      f"({r['wall_ratio']:.3f}x)  eval round {r['s_eval_round']:5.2f} s  build {r['build_s']:5.1f} s  "
                      f"states on disk: {r['states_on_disk']}", flush=True)
    print("targets: peak RSS at the largest N <= 1.3x the smallest, s/round <= 1.2x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_round": args.per_round, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
