"""FedRot-LoRA's alignment on real uploads (issue 28): the aggregation error of FedIT's average and of FedRot-LoRA's
aligned average (side A, side B) on the *same* uploads, round by round of a FedIT run on the demo configuration.

    .venv/bin/python benchmarks/fedrot_alignment.py [--rounds 8] [--set KEY=VALUE ...]

Every round the clients train from FedIT's broadcast; the server's uploads are then aggregated three ways and
``agg_error`` (Σ over layers of ‖ideal − delivered‖_F / ‖ideal‖_F, no d×k matrix) is measured for each, with the
global adapter the round started from as FedRot's reference. Only FedIT's broadcast continues the run, so every
row compares the rules on identical inputs (the demo table's fedrot row follows its own trajectory instead).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    from fedlora import config
    from fedlora import functional as F
    from fedlora.experiment import build
    from fedlora.runtime.loop import run_round
    from fedlora.runtime.simulation import EmbeddedTransport, make_server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    exp = build(config.load(None, ["method.name=fedit", f"train.rounds={args.rounds}", *args.overrides]))
    server, inner = make_server(exp), EmbeddedTransport(exp)
    uploads: list = []

    class Keep:  # the embedded transport, keeping the round's uploads
        def fit(self, client, broadcasts, round_):  # type: ignore[no-untyped-def]
            up = inner.fit(client, broadcasts, round_)
            uploads.append(up)
            return up

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(inner, name)

    print("| round | FedIT | FedRot, side A | FedRot, side B | (agg_error, Σ over layers) |")
    print("|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        start = {k: v.clone() for k, v in server.global_state.items()}
        uploads.clear()
        run_round(server, Keep(), exp.config, round_, exp.split.global_test, evaluate=False)
        w = exp.method.weights(uploads)
        errs = {}
        for side in (None, "A", "B"):
            total = 0.0
            for _, a_key, b_key, Bs, As in exp.method.layer_factors(uploads):
                B, A = F.fedrot(Bs, As, w, start[b_key], start[a_key], side)
                total += F.relative_error(Bs, As, w, B, A)
            errs[side] = total
        print(f"| {round_} | {errs[None]:.4f} | {errs['A']:.4f} | {errs['B']:.4f} | |", flush=True)


if __name__ == "__main__":
    main()
