"""Where the time of one local step goes, in float32 and bf16 (issue 24: why bf16 misses 0.4× float32).

    .venv/bin/python benchmarks/step_profile.py [--model minilm] [--steps 4] [--repeats 3] [--threads 2]
                                                [--json out.json]

For each dtype (``train.dtype`` float32, or bfloat16 with the frozen base stored in bf16 and autocast), one
experiment is built on the demo's data and shapes and ``LocalTrainer.train`` of client 0 is profiled with
``torch.profiler`` (CPU). The self time of every operator is summed into categories, per step:

- ``matmul``: aten::mm / addmm / bmm / baddbmm / matmul and the fused attention kernels' products;
- ``dropout RNG``: aten::bernoulli_ (the dropout masks of the base model: MiniLM's hidden and attention dropout);
- ``casts and copies``: aten::copy_ / _to_copy / to (autocast's conversions, the state written into the shared
  model and read back);
- ``softmax``, ``layer norm``, ``gelu``, ``optimizer`` (AdamW and gradient clipping: _foreach_*, Optimizer.step,
  norms), ``elementwise`` (add, mul, div, where, ...), ``other``.

Then, timed without the profiler and interleaved repeat after repeat (median of ``--repeats``; wall seconds and
this process's CPU seconds, the steadier figure on a shared machine with ``--threads 1``), the step in each
dtype as the demo runs it, and with the base model's dropout modules set to p = 0 (``nn.Dropout``), which
removes the dropout RNG from both dtypes: a measured answer to "how far would faster dropout masks go".
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from fedlora import config  # noqa: E402
from fedlora.experiment import Experiment, build  # noqa: E402

DTYPES = ("float32", "bfloat16")
MODELS = {"minilm": [], "tiny-bert": ["model.name=tiny-bert", "data.max_examples=240", "train.max_length=24"],
          "smollm2": ["model.name=smollm2", "data.dataset=rotten-tomatoes-gen", "data.max_examples=400",
                      "train.batch_size=8"]}  # as benchmarks/throughput.py times it
CATEGORIES = (  # (category, operator-name fragments), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "flash_attention",
                "scaled_dot_product")),
    ("dropout RNG", ("aten::bernoulli",)),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("softmax", ("softmax",)),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("optimizer", ("_foreach", "Optimizer.", "aten::norm", "linalg_vector_norm", "aten::sqrt", "aten::addcdiv",
                   "aten::addcmul", "aten::lerp")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::where", "aten::masked_fill",
                     "aten::tanh", "aten::rsub", "aten::neg", "aten::fill_", "aten::zero_", "aten::sum",
                     "aten::mean", "aten::all", "aten::nll_loss", "aten::log_softmax", "aten::embedding")),
)


def category(op: str) -> str:
    for name, fragments in CATEGORIES:
        if any(f in op for f in fragments):
            return name
    return "other"


def with_steps(exp: Experiment, steps: int) -> None:
    exp.trainer.cfg = replace(exp.trainer.cfg, local_steps=steps)


def timed_step(exp: Experiment, round_: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per local step. On a shared machine the CPU seconds are the
    steadier figure: with ``--threads 1`` they count this process's work, not the time others held the cores."""
    t, c = time.perf_counter(), time.process_time()
    result = exp.trainer.train(exp.init_state, exp.clients[0], round_)
    return (time.perf_counter() - t) / result.steps, (time.process_time() - c) / result.steps


def set_dropout(exp: Experiment, p: float | None, saved: dict[str, float]) -> None:
    """Set every nn.Dropout of the model to ``p`` (None: back to the values in ``saved``)."""
    for name, m in exp.model.named_modules():
        if isinstance(m, nn.Dropout):
            saved.setdefault(name, m.p)
            m.p = saved[name] if p is None else p


def profile_step(exp: Experiment, steps: int) -> dict[str, Any]:
    timed_step(exp, 1)  # warm-up: kernels, thread pool, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = exp.trainer.train(exp.init_state, exp.clients[0], 2)
    per_cat: dict[str, float] = defaultdict(float)
    ops: list[tuple[str, float, int]] = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / result.steps
        per_cat[category(e.key)] += ms
        ops.append((e.key, ms, e.count // result.steps))
    ops.sort(key=lambda o: -o[1])
    total = sum(per_cat.values())
    return {"profiled_ms_per_step": total, "categories_ms": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"op": k, "ms": round(ms, 2), "calls": n} for k, ms, n in ops[:15]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", choices=MODELS)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    exps = {dt: build(config.load(None, [*MODELS[args.model], f"train.dtype={dt}",
                                         f"train.threads={args.threads}"])) for dt in DTYPES}
    for exp in exps.values():
        with_steps(exp, args.steps)
    profiles = {dt: profile_step(exp, args.steps) for dt, exp in exps.items()}
    saved: dict[str, dict[str, float]] = {dt: {} for dt in DTYPES}
    times: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for rep in range(args.repeats):  # interleaved, so that load from other processes hits every variant alike
        for dt, exp in exps.items():
            for variant, p in (("demo", None), ("no-dropout", 0.0)):
                set_dropout(exp, p, saved[dt])
                wall, cpu_s = timed_step(exp, rep + 3)
                times[f"{dt}/{variant}"].append(wall)
                cpu[f"{dt}/{variant}"].append(cpu_s)
            set_dropout(exp, None, saved[dt])
        print(f"  repeat {rep + 1}: " + "  ".join(f"{k} {v[-1]:.3f} s (cpu {cpu[k][-1]:.3f})"
                                                  for k, v in times.items()), flush=True)
    step = {k: statistics.median(v) for k, v in times.items()}
    cpu_step = {k: statistics.median(v) for k, v in cpu.items()}
    out: dict[str, Any] = {
        "model": args.model, "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
        "attention": {dt: exp.config.train.attention for dt, exp in exps.items()},
        "load_average_start": load, "load_average_end": os.getloadavg()[0],
        "step_s": step, "step_samples": dict(times), "cpu_step_s": cpu_step, "cpu_step_samples": dict(cpu),
        "profiles": profiles,
        "bf16_over_f32": step["bfloat16/demo"] / step["float32/demo"],
        "bf16_over_f32_no_dropout": step["bfloat16/no-dropout"] / step["float32/no-dropout"],
        "cpu_bf16_over_f32": cpu_step["bfloat16/demo"] / cpu_step["float32/demo"],
        "cpu_bf16_over_f32_no_dropout": cpu_step["bfloat16/no-dropout"] / cpu_step["float32/no-dropout"],
    }
    for dt in DTYPES:
        cats = profiles[dt]["categories_ms"]
        print(f"\n{dt}: {profiles[dt]['profiled_ms_per_step']:.0f} ms per profiled step")
        for name, ms in cats.items():
            print(f"  {name:<18} {ms:7.1f} ms  {ms / profiles[dt]['profiled_ms_per_step']:6.1%}")
    print(f"\nbf16 ÷ float32 step: {out['bf16_over_f32']:.2f} as the demo runs; {out['bf16_over_f32_no_dropout']:.2f} "
          f"with the base model's dropout off (CPU seconds: {out['cpu_bf16_over_f32']:.2f} and "
          f"{out['cpu_bf16_over_f32_no_dropout']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
