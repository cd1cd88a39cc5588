"""SmolLM2 on a generation task: seconds per local step, peak memory, and accuracy after a short federated run.

    .venv/bin/python benchmarks/generation.py steps [--steps 5] [--set section.key=value ...]
    .venv/bin/python benchmarks/generation.py accuracy [--methods fedit fedsa] [--set section.key=value ...]

``steps`` builds smollm2 with LoRA on bbc-news-gen at the demo settings (the config defaults: batch 16,
max_length 128, rank 8, q_proj and v_proj) and times ``--steps`` local steps of one client after one warm-up
step, then the evaluation (response perplexity + greedy generation) of 16 test examples. It reports the
process's peak resident memory (VmHWM), which includes loading the model.

``accuracy`` runs each method in a fresh child process with the short-run settings below (any ``--set``
overrides them) and prints exact-match accuracy and response perplexity before and after training, with the
``fedlora run`` command that reproduces each run. The first use of smollm2 converts its GGUF file into the
user cache (about a minute); run ``steps`` first so that the timed runs do not include it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BASE = ["model.name=smollm2", "data.dataset=bbc-news-gen"]
# A short run that fits in minutes of CPU: 150 examples (30 global test, 3 clients of 40, 8 of them each client's
# test split), 2 rounds of 4 steps of 4 examples, 96 tokens (about 35 of them article after the prompt
# template); a higher learning rate than the default 5e-4 because there are only 8 steps per client.
SHORT = ["data.max_examples=150", "data.num_clients=3", "train.rounds=2", "train.local_steps=4",
         "train.batch_size=4", "train.max_length=96", "train.lr=2e-3", "train.eval_every=2",
         "train.eval_batch_size=32"]

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from fedlora import config
from fedlora.report import RunDir
from fedlora.runtime import simulation
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
summary = simulation.run(config.load(None, overrides), RunDir(out, overwrite=True), progress=False)
records = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"summary": summary, "first": records[0], "last": records[-1], "peak_rss_kib": hwm}))
"""


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def steps(args: argparse.Namespace) -> dict[str, float]:
    import numpy as np
    import torch

    from fedlora import config
    from fedlora.experiment import build

    t0 = time.perf_counter()
    exp = build(config.load(None, BASE + args.overrides))
    build_s = time.perf_counter() - t0
    cfg = exp.config
    trainer, data = exp.trainer, exp.clients[0]
    trainer.cfg = replace(cfg.train, local_steps=1)  # one step per call, each timed on its own
    times, cpu = [], []
    for r in range(args.steps + 1):  # call 0 is the warm-up (first-call allocations, kernel selection)
        t, c = time.perf_counter(), time.process_time()
        trainer.train(exp.init_state, data, r, frozen=exp.method.frozen_keys())
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    times, cpu = times[1:], cpu[1:]
    n_eval = min(16, len(data.test) + len(exp.split.global_test))
    idx = np.concatenate([data.test, exp.split.global_test])[:n_eval]
    t = time.perf_counter()
    with torch.no_grad():
        metrics = trainer.evaluate(exp.init_state, idx)
    eval_s = time.perf_counter() - t
    out = {"threads": torch.get_num_threads(), "batch_size": cfg.train.batch_size, "max_length": cfg.train.max_length,
           "rank": cfg.adapter.max_rank, "targets": list(cfg.adapter.targets), "build_seconds": build_s,
           "seconds_per_step_median": statistics.median(times), "seconds_per_step": times,
           "cpu_seconds_per_step_median": statistics.median(cpu),
           "eval_seconds_per_example": eval_s / n_eval, "eval_examples": n_eval, "eval_zero_shot_acc": metrics["acc"],
           "adapter_params": sum(v.numel() for v in exp.init_state.values()),
           "peak_rss_mib": peak_rss_mib()}
    print(f"smollm2 + {cfg.adapter.kind} (r={out['rank']}, {'/'.join(out['targets'])}), batch {out['batch_size']}, "
          f"max_length {out['max_length']}, {out['threads']} threads")
    print(f"  build (load, tokenize, attach): {build_s:.1f} s")
    print(f"  seconds per local step: median {out['seconds_per_step_median']:.2f} s "
          f"(all: {', '.join(f'{x:.2f}' for x in times)}); CPU time {statistics.median(cpu):.2f} s per step")
    print(f"  evaluation: {out['eval_seconds_per_example']:.2f} s per example (ppl + greedy generation)")
    print(f"  peak memory (VmHWM): {out['peak_rss_mib']:.0f} MiB; adapter parameters: {out['adapter_params']:,}")
    return out


def accuracy(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    for i, method in enumerate(args.methods):
        # Round 0 (before training) is the same model for every method (B = 0): evaluate it once, in the first run.
        overrides = BASE + SHORT + [f"method.name={method}"] + ([] if i == 0 else ["train.eval_initial=false"]) \
            + args.overrides
        out_dir = os.path.join(args.runs, method)
        command = "fedlora run " + " ".join(f"--set {o}" for o in overrides) + f" --out {out_dir} --overwrite"
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides), out_dir], capture_output=True,
                              text=True, timeout=3600)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        first, last = (res["first"] if i == 0 else rows[0]["_first"]), res["last"]
        row = {"method": method, "command": command, "seconds": time.perf_counter() - t,
               "acc_personal_mean_before": first["acc_personal_mean"], "acc_personal_mean": last["acc_personal_mean"],
               "acc_global": last["acc_global"], "ppl_personal_mean_before": first["ppl_personal_mean"],
               "ppl_personal_mean": last["ppl_personal_mean"], "ppl_global": last["ppl_global"],
               "peak_rss_mib": res["peak_rss_kib"] / 1024, "_first": first}
        rows.append(row)
        fmt = lambda x: "—" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        print(f"{method}: personal acc {fmt(row['acc_personal_mean_before'])} -> {fmt(row['acc_personal_mean'])}, "
              f"global acc {fmt(row['acc_global'])}, personal ppl {row['ppl_personal_mean_before']:.2f} -> "
              f"{row['ppl_personal_mean']:.2f}, {row['seconds']:.0f} s, peak {row['peak_rss_mib']:.0f} MiB")
        print(f"  {command}")
    return [{k: v for k, v in row.items() if k != "_first"} for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("steps", "accuracy"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=["fedit", "fedsa"])
    ap.add_argument("--runs", default="runs/bench-generation", help="run directories of the accuracy part")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    result = steps(args) if args.part == "steps" else accuracy(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
