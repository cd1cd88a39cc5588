"""Memory and CPU time of local training on a quantized frozen base (model.quantization = none / nf4 / int8), issue 26
part 1, on the CPU backend of bitsandbytes.

    .venv/bin/python benchmarks/quantized.py [--model smollm2] [--batch 8] [--steps 4] [--json PATH]

Each setting is a fresh child process, one CPU thread, train.dtype = float32: SmolLM2-135M on rotten-tomatoes-gen,
one client's --steps local steps of --batch examples. The child reports its resident memory after the experiment
is built (VmRSS), the same after malloc_trim (the heap a load freed handed back: what the model holds), its peak RSS over the whole process (VmHWM: loading
included) and after training, and the process-CPU seconds per local step. Ratios are against "none" in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import os, sys, time, json
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import warnings; warnings.simplefilter("ignore")
from fedlora import config
from fedlora.experiment import build
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
model, batch, steps, quantization = sys.argv[1:]
cfg = config.load(None, [f"model.name={model}", "data.dataset=rotten-tomatoes-gen", "data.max_examples=200",
                         "data.num_clients=2", f"train.batch_size={batch}", f"train.local_steps={steps}",
                         "train.threads=1", "train.dtype=float32", "method.name=fedsa",
                         f"model.quantization={quantization}"])
exp = build(cfg)
rss_built, peak_built = status("VmRSS"), status("VmHWM")
import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap (the float32 copy a load read) back
rss_trimmed = status("VmRSS")
state = exp.init_state
c = time.process_time()
out = exp.trainer.train(state, exp.clients[0], 1)
cpu = time.process_time() - c
from fedlora import quantize
quantized = len(quantize.quantized_layers(exp.model)) if quantization != "none" else 0
print(json.dumps({"quantization": quantization, "quantized_layers": quantized, "rss_built_mib": rss_built, "rss_trimmed_mib": rss_trimmed,
                  "peak_rss_built_mib": peak_built, "peak_rss_after_training_mib": status("VmHWM"),
                  "train_peak_growth_mib": status("VmHWM") - peak_built, "cpu_s_per_step": cpu / int(steps)}))
"""

SETTINGS = ("none", "nf4", "int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    import bitsandbytes  # noqa: F401 (the benchmark needs it; fail here, not in a child)

    rows: list[dict] = []
    for quantization in SETTINGS:
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.batch), str(args.steps), quantization],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"child {quantization} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ref = rows[0] if rows else r
        for key in ("rss_built_mib", "rss_trimmed_mib", "peak_rss_after_training_mib", "cpu_s_per_step"):
            r[key.replace("_mib", "").replace("_s_per_step", "") + "_ratio"] = r[key] / ref[key]
        rows.append(r)
        print(f"{quantization:>5}  {r['quantized_layers']:3d} k-bit layers  RSS built {r['rss_built_mib']:6.0f} MiB "
              f"({r['rss_built_ratio']:.2f}x)  trimmed {r['rss_trimmed_mib']:6.0f} MiB ({r['rss_trimmed_ratio']:.2f}x)  peak {r['peak_rss_after_training_mib']:6.0f} MiB "
              f"({r['peak_rss_after_training_ratio']:.2f}x)  CPU {r['cpu_s_per_step']:6.2f} s/step "
              f"({r['cpu_ratio']:.2f}x)", flush=True)
    if args.json:
        import bitsandbytes as bnb
        import torch

        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dataset": "rotten-tomatoes-gen", "batch": args.batch,
                       "steps": args.steps, "threads": 1, "dtype": "float32", "bitsandbytes": bnb.__version__,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
