"""Peak memory with many clients: peak RSS of a run with 100 tiny-bert clients divided by one with 2.

    .venv/bin/python benchmarks/memory.py [--many 100] [--few 2]

Each run is a fresh child process (so the peaks do not mix) on the same data (all of rotten-tomatoes, IID),
one round with every client training and every client evaluated; the child reports its own VmHWM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import os, sys, json
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from fedlora import config
from fedlora.runtime import simulation
n = int(sys.argv[1])
cfg = config.load(None, ["model.name=tiny-bert", f"data.num_clients={n}", "data.partition=iid",
                         "train.rounds=1", "train.local_steps=2", "train.batch_size=8", "train.max_length=64",
                         "train.threads=1", "train.eval_initial=false"])
simulation.run(cfg, None, progress=False)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"clients": n, "peak_rss_kib": hwm}))
"""


def peak(n: int) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True,
                         timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_kib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--many", type=int, default=100)
    ap.add_argument("--few", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    few, many = peak(args.few), peak(args.many)
    ratio = many / few
    print(f"peak RSS with {args.few:>3} clients: {few / 1024:.0f} MiB")
    print(f"peak RSS with {args.many:>3} clients: {many / 1024:.0f} MiB")
    print(f"ratio {ratio:.3f}  (target <= 1.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"few": args.few, "many": args.many, "few_kib": few, "many_kib": many, "ratio": ratio}, f)


if __name__ == "__main__":
    main()
