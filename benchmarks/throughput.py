"""Local training and evaluation speed in float32 and bf16, against the machine's matmul peak (issue 15).

    .venv/bin/python benchmarks/throughput.py [--models minilm,smollm2] [--repeats 3] [--steps 5] [--threads 2]
                                              [--json out.json]
    .venv/bin/python benchmarks/throughput.py --quick     # under a minute: minilm, 2 repeats of 2 steps

``--quick`` times the demo model only, with fewer steps, repeats and evaluated examples and a shorter matmul peak
probe; it prints the same last JSON line (its figures are noisier: for the README use the full run).

For each model, one experiment per dtype is built (``train.dtype``: float32, or bfloat16 with the frozen base
weights stored in bf16 and adapters, head and optimizer state in float32) on the demo's data and shapes (minilm:
rotten-tomatoes, LoRA r = 8 on query/value, batch 16 × 64 tokens, AdamW; smollm2: rotten-tomatoes-gen, LoRA
r = 8 on q_proj/v_proj, batch 8). Then, repeat after repeat, every configuration runs in turn, so that noise
from other processes on the machine hits all of them alike; each figure is the median over the repeats:

- ``step_s``: wall seconds per local step (``LocalTrainer.train`` of one client: forward, backward, clipping, AdamW),
  for each dtype with each attention implementation (eager, sdpa); ``f32_step_s`` / ``bf16_step_s`` use the one
  ``train.attention = "auto"`` picks (models.resolve_attention), ``best`` the faster of the two. ``cpu_step_s``:
  this process's CPU seconds per step, the steadier figure on a shared machine with ``--threads 1`` (with more
  threads it also counts the time threads spin while waiting for each other).
- achieved FLOP/s: the FLOPs of one step counted by ``torch.utils.flop_counter`` (every matmul and attention
  product, forward and backward) ÷ ``step_s``, and its fraction of the matmul peak measured here for that dtype
  (2048 × 2048 products, best of several).
- ``eval_per_s``: examples per second of ``LocalTrainer.evaluate`` (length-sorted batches, inference_mode, the
  training dtype); for minilm also the evaluation path before issue 15 (float32, no_grad, loss inside the model).
- evaluation's share of one demo round (minilm only): a round trains 3 clients × ``train.local_steps`` steps and
  evaluates every client's test split and the global test set; share = eval / (train + eval) from the figures
  above and the demo split's sizes.

The last line printed is one JSON object with at least ``f32_step_s`` and ``bf16_step_s`` (the demo model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fedlora import config, models  # noqa: E402
from fedlora.experiment import Experiment, build  # noqa: E402

DTYPES = ("float32", "bfloat16")
ATTENTION = ("eager", "sdpa")
MODELS = {  # the demo's shapes; smollm2 with the generation defaults of docs/generation.md, batch 8
    "minilm": [],
    "tiny-bert": ["model.name=tiny-bert", "data.max_examples=240", "train.max_length=24"],  # the tests' check
    "smollm2": ["model.name=smollm2", "data.dataset=rotten-tomatoes-gen", "data.max_examples=400",
                "train.batch_size=8"],
}
TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n_max: int = 2048, seconds: float = 2.0) -> tuple[float, int]:
    """FLOP/s of the best of repeated n×n products in ``dtype`` (2n³ FLOPs each): the machine's practical peak.
    n doubles from 256 up to ``n_max`` while a product takes under 0.2 s (bf16 without bf16 units is so slow
    that one 2048² product would take half a minute). Returns (FLOP/s, n)."""
    n = 256
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        t = time.perf_counter()
        a @ b  # also the warm-up: kernels and thread pool
        if n >= n_max or time.perf_counter() - t > 0.2:
            break
        n *= 2
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best, n


def step_flops(exp: Experiment) -> int:
    """FLOPs of one local step (forward and backward of one batch), counted by PyTorch's flop counter."""
    trainer, cfg = exp.trainer, exp.config.train
    trainer.load(exp.init_state)
    params = [p for k, p in exp.slots.items() if k not in exp.method.frozen_keys()]
    for p in params:
        p.requires_grad_(True)
    idx = exp.clients[0].train[:cfg.batch_size]
    exp.model.train()
    with FlopCounterMode(display=False) as counter:
        with trainer._autocast():
            loss = exp.task.loss(exp.model, exp.task.batch(idx, exp.device))
        loss.backward()
    exp.model.eval()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return int(counter.get_total_flops())


def time_steps(exp: Experiment, round_: int, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per local step of client 0 (``steps`` steps from the initial
    state)."""
    trainer = exp.trainer
    full = trainer.cfg
    trainer.cfg = replace(full, local_steps=steps)
    try:
        t, c = time.perf_counter(), time.process_time()
        result = trainer.train(exp.init_state, exp.clients[0], round_)
        return (time.perf_counter() - t) / result.steps, (time.process_time() - c) / result.steps
    finally:
        trainer.cfg = full


def time_eval(exp: Experiment, idx: np.ndarray) -> float:
    """Examples per second of the evaluation path (``LocalTrainer.evaluate``)."""
    t = time.perf_counter()
    exp.trainer.evaluate(exp.init_state, idx)
    return len(idx) / (time.perf_counter() - t)


def time_eval_before(exp: Experiment, idx: np.ndarray) -> float:
    """Examples per second of the evaluation path before issue 15: the same length-sorted batches, under
    ``torch.no_grad`` (autograd's version counters still kept), with the loss computed inside the model."""
    task, bs = exp.task, exp.config.train.eval_batch_size
    exp.trainer.load(exp.init_state)
    order = np.argsort(task._lengths[idx], kind="stable")
    t = time.perf_counter()
    with torch.no_grad(), exp.trainer._autocast():
        for start in range(0, len(idx), bs):
            out = exp.model(**task.batch(idx[order[start:start + bs]], exp.device))
            out.logits.argmax(-1).cpu()
            float(out.loss)
    return len(idx) / (time.perf_counter() - t)


def bench_model(name: str, args: argparse.Namespace, peaks: dict[str, float], slow_bf16: bool) -> dict[str, Any]:
    overrides = [*MODELS[name], f"train.threads={args.threads}"]
    # Where bf16 is emulated, only the encoders are timed in bf16 (a SmolLM2 step would take many minutes).
    dtypes = ("float32",) if slow_bf16 and name == "smollm2" else DTYPES
    exps = {dt: build(config.load(None, [*overrides, f"train.dtype={dt}"])) for dt in dtypes}
    device = exps["float32"].device
    auto = {dt: models.resolve_attention("auto", device, dt) for dt in dtypes}
    causal = exps["float32"].task.kind == "generation"
    test = exps["float32"].split.global_test
    eval_idx = {dt: test[:args.gen_eval if causal else args.eval_examples] for dt in dtypes}
    n_steps = dict.fromkeys(DTYPES, args.steps)
    attentions = {dt: ATTENTION for dt in dtypes}
    if slow_bf16 and "bfloat16" in exps:  # bf16 by conversion is ~100x slower: one step with the auto attention, once, on a few examples
        n_steps["bfloat16"], attentions["bfloat16"] = 1, (auto["bfloat16"],)
        eval_idx["bfloat16"] = eval_idx["bfloat16"][:args.slow_eval]
    # The FLOPs of a step do not depend on the dtype: counted once, in float32 with eager attention (whose
    # products the counter sees one by one).
    models.set_attention(exps["float32"].model, "eager")
    flops = dict.fromkeys(DTYPES, step_flops(exps["float32"]))
    steps: dict[str, list[float]] = {f"{dt}/{att}": [] for dt in dtypes for att in attentions[dt]}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    evals: dict[str, list[float]] = {dt: [] for dt in dtypes}
    evals_before: list[float] = []
    for rep in range(args.repeats):
        for dt, exp in exps.items():
            if slow_bf16 and dt == "bfloat16" and rep > 0:
                continue
            for att in attentions[dt]:
                models.set_attention(exp.model, att)
                wall, cpu_s = time_steps(exp, rep + 1, n_steps[dt])
                steps[f"{dt}/{att}"].append(wall)
                cpu[f"{dt}/{att}"].append(cpu_s)
            models.set_attention(exp.model, auto[dt])
            evals[dt].append(time_eval(exp, eval_idx[dt]))
            if dt == "float32" and not causal:
                evals_before.append(time_eval_before(exp, eval_idx[dt]))
        print(f"  {name} repeat {rep + 1}: " + "  ".join(f"{k} {v[-1]:.3f} s" for k, v in steps.items()), flush=True)
    step_s = {k: statistics.median(v) for k, v in steps.items()}
    cpu_step_s = {k: statistics.median(v) for k, v in cpu.items()}
    out: dict[str, Any] = {"model": name, "step_s": step_s, "auto_attention": auto,
                           "step_samples": steps, "cpu_step_s": cpu_step_s, "cpu_step_samples": cpu,
                           "flops_per_step": flops,
                           "eval_per_s": {dt: statistics.median(v) for dt, v in evals.items()},
                           "eval_examples": {dt: int(len(v)) for dt, v in eval_idx.items()}, "steps_timed": n_steps}
    for dt in dtypes:
        chosen = step_s[f"{dt}/{auto[dt]}"]
        out[f"{dt}_step_s"] = chosen
        out[f"{dt}_cpu_step_s"] = cpu_step_s[f"{dt}/{auto[dt]}"]
        out[f"{dt}_best_step_s"] = min(step_s[f"{dt}/{att}"] for att in attentions[dt])
        out[f"{dt}_flop_s"] = flops[dt] / chosen
        out[f"{dt}_of_peak"] = flops[dt] / chosen / peaks[dt]
    if "bfloat16" in exps:
        out["bf16_over_f32"] = out["bfloat16_step_s"] / out["float32_step_s"]
        out["bf16_over_f32_best"] = out["bfloat16_best_step_s"] / out["float32_best_step_s"]
        out["cpu_bf16_over_f32"] = out["bfloat16_cpu_step_s"] / out["float32_cpu_step_s"]
    if evals_before:
        out["eval_per_s_before"] = statistics.median(evals_before)
        out["demo_round_eval_share"] = eval_share(exps, out)
    return out


def eval_share(exps: dict[str, Experiment], fig: dict[str, Any]) -> dict[str, float]:
    """Evaluation's share of one demo round (all clients train, then every test split and the global test set
    are evaluated), before issue 15 (float32, old evaluation path) and now in each dtype."""
    exp = exps["float32"]
    n_eval = sum(len(c.test) for c in exp.clients) + len(exp.split.global_test)
    train_steps = len(exp.clients) * config.Config().train.local_steps  # the demo's steps, not --steps
    shares = {}
    for label, step, rate in (("before", fig["step_s"]["float32/sdpa"], fig["eval_per_s_before"]),
                              *((dt, fig[f"{dt}_step_s"], fig["eval_per_s"][dt]) for dt in DTYPES)):
        train_s, eval_s = train_steps * step, n_eval / rate
        shares[label] = eval_s / (train_s + eval_s)
    shares["eval_examples_per_round"] = n_eval
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated, from: " + ", ".join(MODELS) + " (default: minilm,smollm2; "
                                     "with --quick: minilm)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="local steps timed per configuration and repeat")
    ap.add_argument("--gen-eval", type=int, default=8, help="examples evaluated for a causal LM (greedy generation)")
    ap.add_argument("--eval-examples", type=int, default=480, help="global-test examples timed (classification)")
    ap.add_argument("--slow-eval", type=int, default=16, help="examples evaluated in bf16 where bf16 is emulated")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--quick", action="store_true", help="under a minute: the demo model only, 2 repeats of 2 steps, "
                                                         "64 evaluated examples, a 0.5 s matmul probe")
    args = ap.parse_args()
    if args.quick:
        args.models, args.repeats, args.steps, args.eval_examples = args.models or "minilm", 2, 2, 64
    args.models = args.models or "minilm,smollm2"
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}; fast bf16 here: {models.has_fast_bf16(device)} (train.dtype auto = "
          f"{models.resolve_dtype('auto', device)}); torch threads {args.threads}; load average {load[0]:.1f}")
    measured = {dt: matmul_peak(TORCH_DTYPE[dt], seconds=0.5 if args.quick else 2.0) for dt in DTYPES}
    peaks = {dt: v[0] for dt, v in measured.items()}
    print("matmul peak: " + ", ".join(f"{dt} {v / 1e9:.1f} GFLOP/s ({n}²)" for dt, (v, n) in measured.items()),
          flush=True)
    slow_bf16 = not models.has_fast_bf16(device)
    results = []
    for m in args.models.split(","):
        results.append(bench_model(m, args, peaks, slow_bf16))
        print(json.dumps(results[-1]), flush=True)  # each model's figures as soon as they exist
    for r in results:
        print(f"\n{r['model']}: seconds per local step (median of {args.repeats}; auto attention: {r['auto_attention']})")
        for k, v in r["step_s"].items():
            print(f"  {k:<18} {v:.3f}")
        for dt in r["eval_per_s"]:
            print(f"  {dt}: {r[f'{dt}_flop_s'] / 1e9:.1f} GFLOP/s achieved = {r[f'{dt}_of_peak']:.1%} of the "
                  f"{dt} matmul peak; evaluation {r['eval_per_s'][dt]:.1f} examples/s")
        if "bf16_over_f32" in r:
            print(f"  bf16 ÷ float32 step: {r['bf16_over_f32']:.2f} (best attention each: {r['bf16_over_f32_best']:.2f}; "
                  f"CPU seconds: {r['cpu_bf16_over_f32']:.2f}; target <= 0.4 where bf16 units exist)")
        if "demo_round_eval_share" in r:
            s = r["demo_round_eval_share"]
            print(f"  evaluation before: {r['eval_per_s_before']:.1f} examples/s; share of a demo round "
                  f"({s['eval_examples_per_round']} examples evaluated): before {s['before']:.1%}, now float32 "
                  f"{s['float32']:.1%}, bf16 {s['bfloat16']:.1%}")
    demo = results[0] if results else {}
    summary = {"device": str(device), "fast_bf16": models.has_fast_bf16(device),
               "auto_dtype": models.resolve_dtype("auto", device), "threads": args.threads,
               "load_average_start": load[0], "load_average_end": os.getloadavg()[0],
               "matmul_peak_flop_s": peaks, "models": results,
               "f32_step_s": demo.get("float32_step_s"), "bf16_step_s": demo.get("bfloat16_step_s"),
               "bf16_over_f32": demo.get("bf16_over_f32"), "cpu_bf16_over_f32": demo.get("cpu_bf16_over_f32"),
               "quick": args.quick}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
