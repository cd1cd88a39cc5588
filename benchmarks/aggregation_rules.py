"""Server-side cost of every aggregation rule on a 7B-shaped adapter set, on the CPU (issue 12).

    .venv/bin/python benchmarks/aggregation_rules.py [--layers 64 --d 4096 --rank 16 --clients 10 --threads 2]
                                                     [--json out.json]

Each rule runs on the same synthetic uploads (``benchmarks/aggregation.py``'s ``make_layer``: a shared component
plus client drift, 64 layers of 4096×4096, r = 16, 10 clients, float32) and is timed per layer, the median of
``--repeats`` passes summed over layers [target ≤ 2 s each], with its ratio to FedIT's plain means measured in the
same run (the machine is shared: compare ratios, not seconds). With ``--threads 1`` the CPU seconds are what the wall
time would be on an idle machine whatever else runs, so that is the column to read against the target there. For FlexLoRA and FLoRA-NA a second row has clients of
ranks 4/8/16 (cycled). None of the rules forms a d×k matrix; tests/test_more_methods.py checks that on layers whose
d×k matrix would not fit in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/aggregation.py

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from aggregation import Layer, add_shape_args, make_layer, make_weights, time_route  # noqa: E402

from fedlora import functional as F  # noqa: E402


def rules(w: list[float]) -> dict[str, object]:
    """name -> route (Bs, As) -> (B, A), the server's work for one layer."""
    return {
        "fedit (A and B means)": lambda Bs, As: F.fedit(Bs, As, w),
        "rolora (one side's mean)": lambda Bs, As: (F.weighted_mean(Bs, w), As[0]),
        "feddpa (global adapter's means)": lambda Bs, As: F.fedit(Bs, As, w),
        "fedsvd (B mean + SVD re-factorisation)": lambda Bs, As: F.fedsvd(Bs, As[0], w),
        "lora-fair (means + ridge correction)": lambda Bs, As: F.lora_fair(Bs, As, w),
        "flexlora (truncated SVD, B = UΣ)": lambda Bs, As: F.flexlora(Bs, As, w),
        "flora-na (truncated SVD, balanced)": lambda Bs, As: F.flora_na(Bs, As, w),
    }


def hetero(layers: list[Layer], ranks: tuple[int, ...]) -> list[Layer]:
    """The same uploads cut to per-client ranks (cycled), for the rules that accept them."""
    return [([B[:, :ranks[u % len(ranks)]] for u, B in enumerate(Bs)],
             [A[:ranks[u % len(ranks)]] for u, A in enumerate(As)]) for Bs, As in layers]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = make_weights(args)
    layers = [make_layer(i, args) for i in range(args.layers)]
    rows = []
    for Bs, As in layers:  # warm-up: first touches of the layers' memory are not charged to the first rule
        F.fedit(Bs, As, w)
    for name, fn in rules(w).items():
        timing, _ = time_route(fn, layers, args.repeats, 0)  # type: ignore[arg-type]
        rows.append({"rule": name, **timing})
        print(f"{name:42s} {timing['seconds']:7.3f} s", flush=True)
    ranks = (4, 8, 16)
    mixed = hetero(layers, ranks)
    for name in ("flexlora (truncated SVD, B = UΣ)", "flora-na (truncated SVD, balanced)"):
        fn = rules(w)[name]
        timing, _ = time_route(fn, mixed, args.repeats, 0)  # type: ignore[arg-type]
        rows.append({"rule": f"{name}, ranks {list(ranks)}", **timing})
        print(f"{rows[-1]['rule']:42s} {timing['seconds']:7.3f} s", flush=True)
    base = rows[0]["seconds"]
    print()
    print(f"{args.layers} layers of {args.d}×{args.d}, r = {args.rank}, {args.clients} clients, float32, "
          f"{args.threads} threads; median of {args.repeats} passes per layer, summed")
    print("| rule | seconds | × FedIT | CPU seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['seconds']:.3f} | {r['seconds'] / base:.2f} | {r['cpu_seconds']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
