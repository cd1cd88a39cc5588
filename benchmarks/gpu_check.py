"""A GPU check in one script (issue 26, part 6): within 5 minutes on one GPU, and on the CPU with ``--device cpu``.

    .venv/bin/python benchmarks/gpu_check.py                      # CUDA, bf16 where the GPU has it
    .venv/bin/python benchmarks/gpu_check.py --device cpu --models tiny-llama,tiny-bert --steps 2 --repeats 1

It needs only what fedlora needs (torch, transformers, PEFT and fedlora's small dependencies). For each model
(default: tiny-llama on rotten-tomatoes-gen and the bundled encoder MiniLM on rotten-tomatoes), on the device and
in ``--dtype`` (``auto``: what ``train.dtype = "auto"`` resolves to there, bf16 on a GPU with native bf16):

- ``step_ratio``: seconds per local step of fedlora's ``LocalTrainer`` ÷ a bare PEFT loop on the same model, the
  same batches, the same autocast, AdamW and clipping (alternating, medians over ``--repeats``; target ≤ 1.05);
- ``peak_memory_mib``: peak GPU memory allocated by torch during the steps (``torch.cuda.max_memory_allocated``),
  or the peak RSS of the process so far on the CPU;
- ``same_result_twice``: one FedSA-LoRA round of 8 clients run twice with the same seed gives the same metrics
  (every field of the round records but their wall times);
- ``quantized``: where bitsandbytes imports and the model is causal, one FedSA-LoRA round with an NF4 base (its
  train loss, which must be finite), else the reason it was skipped.

The last line printed is one JSON object with the device's name.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from fedlora import config  # noqa: E402
from fedlora.experiment import Experiment, build  # noqa: E402
from fedlora.report import RunDir  # noqa: E402
from fedlora.runtime import simulation  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import bare_client_steps  # noqa: E402  (the same bare loop as the overhead benchmark)

MODELS = {  # small on purpose: the whole check must fit 5 minutes on one GPU
    "tiny-llama": ["model.name=tiny-llama", "data.dataset=rotten-tomatoes-gen", "train.max_length=96",
                   "train.max_new_tokens=8"],
    "minilm": ["model.name=minilm"],
    "tiny-bert": ["model.name=tiny-bert", "train.max_length=24"],
}
COMMON = ["method.name=fedsa", "data.num_clients=8", "data.max_examples=480", "data.min_examples_per_client=8",
          "train.rounds=1", "train.batch_size=8"]


def bare_steps(exp: Experiment, steps: int) -> None:
    """A plain PEFT training loop of client 0 (benchmarks/overhead.py's), on the same batches and autocast."""
    exp.trainer.load(exp.init_state)
    bare_client_steps(exp, exp.clients[0], 1, steps, bf16=exp.trainer.bf16)


def fedlora_steps(exp: Experiment, steps: int) -> None:
    from dataclasses import replace

    full = exp.trainer.cfg
    exp.trainer.cfg = replace(full, local_steps=steps)
    try:
        exp.trainer.train(exp.init_state, exp.clients[0], 1)
    finally:
        exp.trainer.cfg = full


def timed(fn: Any, exp: Experiment, steps: int) -> float:
    if exp.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn(exp, steps)
    if exp.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def round_records(overrides: list[str], out: Path) -> list[dict[str, Any]]:
    simulation.run(config.load(None, overrides), RunDir(out), progress=False)
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    overrides = [*MODELS[name], *COMMON, f"train.device={args.device}", f"train.dtype={args.dtype}",
                 f"train.threads={args.threads}"]
    exp = build(config.load(None, overrides))
    if exp.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare_steps(exp, 1)  # warm-up: kernels, allocator
    fedlora_steps(exp, 1)
    times: dict[str, list[float]] = {"fedlora": [], "bare": []}
    for _ in range(args.repeats):  # alternating, so that noise hits both alike
        times["fedlora"].append(timed(fedlora_steps, exp, args.steps))
        times["bare"].append(timed(bare_steps, exp, args.steps))
    if exp.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = {k: statistics.median(v) for k, v in times.items()}
    resolved = [f"train.dtype={exp.config.train.dtype}", f"train.device={exp.device.type}"]
    first = round_records([*overrides, *resolved], tmp / f"{name}-a")
    second = round_records([*overrides, *resolved], tmp / f"{name}-b")
    out: dict[str, Any] = {"model": name, "dtype": exp.config.train.dtype, "step_s": step, "step_samples": times,
                           "step_ratio": step["fedlora"] / step["bare"], "peak_memory_mib": peak,
                           "same_result_twice": first == second, "records": len(first)}
    out["quantized"] = quantized_round(name, overrides, exp, tmp)
    return out


def quantized_round(name: str, overrides: list[str], exp: Experiment, tmp: Path) -> dict[str, Any]:
    if exp.task.kind != "generation":
        return {"skipped": "an encoder: model.quantization takes causal LMs"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed"}
    try:
        records = round_records([*overrides, "model.quantization=nf4"], tmp / f"{name}-nf4")
    except Exception as e:  # reported, not hidden: the check's job is to say what works on this device
        return {"failed": f"{type(e).__name__}: {e}"}
    losses = [r["train_loss"] for r in records if r.get("train_loss") is not None]
    return {"train_loss": losses[-1] if losses else None,
            "finite": bool(losses) and all(math.isfinite(x) for x in losses)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--models", default="tiny-llama,minilm", help="comma-separated, from: " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=10, help="local steps timed per repeat and side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for m in args.models.split(","):
            results.append(check_model(m, args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    summary = {"device": args.device, "device_name": name, "torch": torch.__version__, "models": results,
               "seconds": time.perf_counter() - start,
               "all_same_twice": all(r["same_result_twice"] for r in results),
               "max_step_ratio": max(r["step_ratio"] for r in results)}
    for r in results:
        print(f"{r['model']} ({r['dtype']}): fedlora {r['step_s']['fedlora']:.4f} s vs bare PEFT "
              f"{r['step_s']['bare']:.4f} s per step = {r['step_ratio']:.3f} (target <= 1.05); peak "
              f"{r['peak_memory_mib']:.0f} MiB; same result twice: {r['same_result_twice']}; nf4: {r['quantized']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
