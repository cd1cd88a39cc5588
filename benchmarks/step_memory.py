"""Peak memory of local training on a long-sequence causal LM, with activation checkpointing and with gradient
accumulation, against neither (issue 26, part 2).

    .venv/bin/python benchmarks/step_memory.py [--model smollm2] [--max-length 512] [--batch 8] [--json PATH]

Each setting is a fresh child process, one CPU thread, float32: SmolLM2-135M on bbc-news-gen (long articles,
truncated to --max-length tokens), one client's 2 local steps of --batch examples. The child reports the growth of
its peak RSS (VmHWM, from /proc/self/status) over the built experiment, which is what the training steps added
(activations, gradients, optimizer state), and the process-CPU seconds of the 2 steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import os, sys, time, json
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from fedlora import config
from fedlora.experiment import build
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
model, max_length, batch, *extra = sys.argv[1:]
cfg = config.load(None, [f"model.name={model}", "data.dataset=bbc-news-gen", "data.max_examples=200",
                         "data.num_clients=2", f"train.max_length={max_length}", f"train.batch_size={batch}",
                         "train.local_steps=2", "train.threads=1", "train.dtype=float32", *extra])
exp = build(cfg)
before = hwm()
c = time.process_time()
exp.trainer.train(exp.init_state, exp.clients[0], 1)
cpu = time.process_time() - c
print(json.dumps({"settings": extra, "peak_rss_before_mib": before, "train_peak_growth_mib": hwm() - before,
                  "cpu_s_2_steps": cpu}))
"""

SETTINGS = ([], ["train.gradient_checkpointing=true"], ["train.micro_batch_size=2"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for extra in SETTINGS:
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.max_length), str(args.batch), *extra],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"child {extra} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["memory_ratio"] = r["train_peak_growth_mib"] / (rows[0]["train_peak_growth_mib"] if rows else
                                                          r["train_peak_growth_mib"])
        r["cpu_ratio"] = r["cpu_s_2_steps"] / (rows[0]["cpu_s_2_steps"] if rows else r["cpu_s_2_steps"])
        rows.append(r)
        print(f"{' '.join(extra) or 'plain':>36}  training adds {r['train_peak_growth_mib']:7.0f} MiB peak RSS "
              f"({r['memory_ratio']:.2f}x)  CPU {r['cpu_s_2_steps']:6.1f} s for 2 steps ({r['cpu_ratio']:.2f}x)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "max_length": args.max_length, "batch": args.batch, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
