"""Framework overhead of the embedded runtime: one round (all clients train, upload, aggregate, broadcast) divided
by a bare PyTorch loop doing the same local steps on the same batches with the same optimizer.

    .venv/bin/python benchmarks/overhead.py [--model minilm] [--repeats 3] [--set section.key=value ...]

Both are timed in the same process, alternating, so machine noise hits both; the ratio of medians is reported.
Evaluation is left out of both (it is the same forward passes either way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from fedlora import config  # noqa: E402
from fedlora.client import batch_indices, round_seed  # noqa: E402
from fedlora.experiment import build  # noqa: E402
from fedlora.runtime.loop import run_round  # noqa: E402
from fedlora.runtime.simulation import EmbeddedTransport, make_server  # noqa: E402


def bare_client_steps(exp, data, round_: int, steps: int, bf16: bool = False) -> None:  # type: ignore[no-untyped-def]
    """What any hand-written loop must do for one client: the same batches, forward (under bf16 autocast when
    ``bf16``), backward, clip, AdamW step. Also the baseline of benchmarks/gpu_check.py."""
    cfg = exp.config.train
    params = [p for k, p in exp.slots.items() if k not in exp.method.frozen_keys()]
    for p in params:
        p.requires_grad_(True)
    exp.model.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    seed = round_seed(cfg.seed, round_, data.client_id)
    torch.manual_seed(seed)
    for idx in batch_indices(data.train, steps, cfg.batch_size, seed):
        with torch.autocast(exp.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = exp.task.loss(exp.model, exp.task.batch(idx, exp.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    exp.model.eval()
    for p in params:
        p.requires_grad_(False)


def bare_round(exp, round_: int) -> None:  # type: ignore[no-untyped-def]
    """The bare loop for every client of a round, in the run's compute dtype (bf16 autocast where train.dtype
    resolved to bf16: the frozen base is then stored in bf16, which a float32 loop could not multiply)."""
    for data in exp.clients:
        bare_client_steps(exp, data, round_, exp.config.train.local_steps, bf16=exp.trainer.bf16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    cfg = config.load(None, ["train.local_steps=10", "data.max_examples=2000", "train.max_length=64",
                             "train.threads=2", *args.overrides])
    exp = build(cfg)
    server = make_server(exp)
    transport = EmbeddedTransport(exp)
    bare_round(exp, 0)  # warm-up (allocator, kernels)
    framework, bare = [], []
    for rep in range(1, args.repeats + 1):
        t = time.perf_counter()
        run_round(server, transport, exp.config, rep, exp.split.global_test, evaluate=False)
        framework.append(time.perf_counter() - t)
        t = time.perf_counter()
        bare_round(exp, rep)
        bare.append(time.perf_counter() - t)
    ratio = statistics.median(framework) / statistics.median(bare)
    out = {"model": cfg.model.name, "method": cfg.method.name, "clients": cfg.data.num_clients,
           "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size,
           "framework_round_s": framework, "bare_round_s": bare, "ratio": ratio}
    print(f"embedded round  median {statistics.median(framework):.2f} s  {['%.2f' % x for x in framework]}")
    print(f"bare loop       median {statistics.median(bare):.2f} s  {['%.2f' % x for x in bare]}")
    print(f"overhead ratio  {ratio:.3f}  (target <= 1.10)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
