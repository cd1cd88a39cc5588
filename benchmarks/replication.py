"""Replication of the seed papers' claims, second edition (issue 17): a protocol that can tell the methods apart.

    .venv/bin/python benchmarks/replication.py --workers 2     # the full document (docs/results.md), resumable
    .venv/bin/python benchmarks/replication.py --quick --out DIR  # tiny-bert, every code path, a few minutes
    .venv/bin/python benchmarks/replication.py --report-only    # rewrite the document from the finished runs

Every run is a cell of ``fedlora.compare`` (planned by ``compare.plan``, run by ``compare.run_grid``) in its own
directory under ``--out``, so an interrupted replication continues where it stopped: finished runs are never redone.
Phases, block by block in the order of BLOCKS (the first ones are the claims that matter most, so a partial run
has them):

1. **learning-rate tuning** on a validation split (``data.validation_fraction``: part of each client's training
   data; the test splits are never read), seed TUNE_SEED (not an evaluation seed), the same candidates and the same
   budget for every method: candidate lrs = the optimizer's reference lr × MULTIPLIERS; the best final mean
   validation accuracy over clients wins (ties: the smaller lr);
2. **the grid**: every variant of the block at its tuned lr, SEEDS (seed-major, so that a partial run has every
   variant on its first seeds);
3. **analyses** from the finished runs: majority-class floors from the data splits, A/B similarity of the
   local-only runs' adapters (``fedlora.analyze.layer_similarities``), paired differences with 95% intervals
   (claims_check.py), and the document.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_check as cc  # noqa: E402  (benchmarks/claims_check.py: statistics and verdicts)
from claims_check import Block, Claim, Variant  # noqa: E402

TUNE_SEED = 100
SEEDS = (0, 1, 2, 3, 4)
CLIENTS = 3
# Each optimizer's reference lr for LoRA: SGD at the FedSA-LoRA paper's 2e-2, AdamW at fedlora's default 3e-3;
# other adapters scale it as their AdamW defaults do (VeRA's vectors need a larger lr). Candidates: × MULTIPLIERS.
REFERENCE_LR = {"sgd": 2e-2, "adamw": 3e-3}
MULTIPLIERS = {"sgd": (1.0, 3.0, 10.0), "adamw": (1 / 3, 1.0, 3.0)}

# The budget of every run, chosen from measured learning curves (the document reports them): R rounds of S local
# steps of B examples, i.e. R·S·B examples seen per client. 1200 examples: 180 for the global test set, ≥ 150 per
# client (so ≥ 30 in each client's own test split).
ROUNDS, STEPS, BATCH = 4, 12, 8
BUDGET = ("model.name=minilm", "data.max_examples=1200", "data.test_fraction=0.15", "data.client_test_fraction=0.2",
          "data.min_examples_per_client=150", "data.partition=dirichlet", "data.alpha=0.5",
          f"data.num_clients={CLIENTS}", f"train.rounds={ROUNDS}", f"train.local_steps={STEPS}",
          f"train.batch_size={BATCH}", "train.max_length=32", "train.eval_every=2", "train.threads=1",
          "adapter.rank=8", "adapter.alpha=16")
QUICK_ROUNDS, QUICK_STEPS, QUICK_BATCH = 2, 1, 4
QUICK = ("model.name=tiny-bert", "data.max_examples=160", "data.test_fraction=0.15", "data.client_test_fraction=0.25",
         "data.min_examples_per_client=24", "data.partition=dirichlet", "data.alpha=0.5", f"data.num_clients={CLIENTS}",
         f"train.rounds={QUICK_ROUNDS}", f"train.local_steps={QUICK_STEPS}", f"train.batch_size={QUICK_BATCH}",
         "train.max_length=16", "train.eval_every=1", "train.threads=1", "adapter.rank=4", "adapter.alpha=8")

# Tuning runs evaluate on validation splits only, and at every round: their curves are the learning curves.
TUNING = ("data.validation_fraction=0.25", "train.eval_every=1")

# Per-dataset changes to BUDGET, chosen from learning curves measured at BUDGET first (the PROBES below; the document
# reports them): at 12 local steps per round nothing learns rotten-tomatoes' sentiment beyond its clients' label skew
# under SGD (every lr candidate, every method, centralized training too); under AdamW the federated clients stay on
# the floor while centralized training, which sees 3× the examples, rises well above its own: the sentiment is learnt
# after about a thousand examples. With AdamW and 3× the local steps FedSA-LoRA's validation accuracy rose 6.6 points
# above the floor in 4 rounds (seed 100) while SGD at 10× its reference lr stayed on it. So rotten-tomatoes runs
# under AdamW at 36 steps; bbc-news learns at BUDGET under both optimizers.
DATASET_BUDGET = {"rotten-tomatoes": ("train.local_steps=36",)}

DATASETS = {"rotten-tomatoes": "rotten-tomatoes", "bbc-news": "bbc-news"}
QUICK_DATASET = "rotten-tomatoes"


def _v(key: str, method: str, label: str, **kw: Any) -> Variant:
    return Variant(key=key, method=method, label=label, **kw)


# Claim 1's cast under the authors' protocol: every classification head private (FedSA keeps its own by design).
PRIVATE = (_v("fedsa", "fedsa", "FedSA-LoRA"),
           _v("fedit-private", "fedit", "FedIT, head private", share_head=False),
           _v("ffa-private", "ffa", "FFA-LoRA, head private", share_head=False),
           _v("feddpa-private", "feddpa", "FedDPA-LoRA, head private", share_head=False),
           _v("local", "local-only", "local only", reference=True),
           _v("central", "fedit", "centralized (pooled data)", central=True, reference=True))
CLAIM1 = tuple(Claim("1", "fedsa", other, "personal") for other in ("fedit-private", "ffa-private", "feddpa-private"))
SHARED = (_v("fedit", "fedit", "FedIT, head shared", tune_as="fedit-private"),
          _v("ffa", "ffa", "FFA-LoRA, head shared", tune_as="ffa-private"),
          _v("feddpa", "feddpa", "FedDPA-LoRA, head shared", tune_as="feddpa-private"))
GLOBAL = (_v("flora-na", "flora-na", "FLoRA-NA"), _v("fedex", "fedex", "FedEx-LoRA"), _v("flora", "flora", "FLoRA"),
          _v("flexlora", "flexlora", "FlexLoRA"),
          # issue 28: the newest global-model methods, each against FedIT, FlexLoRA and FLoRA-NA (CLAIM3_NEW)
          _v("fedrot", "fedrot", "FedRot-LoRA"), _v("fed-sb", "fed-sb", "Fed-SB (LoRA-SB)", adapter="lora-sb"))
# Not a seed paper's claim ("new"): whether each beats the global-model baselines under this protocol.
CLAIM3_NEW = tuple(Claim("new", new, o, "global") for new in ("fedrot", "fed-sb") for o in ("fedit", "flexlora", "flora-na"))
ADAPTER_VARIANTS = tuple(
    _v(f"{base}-{kind}", method, f"{label} ({kind})", adapter=kind, share_head=share)
    for kind in ("rslora", "vera")
    for base, method, label, share in (("fedsa", "fedsa", "FedSA-LoRA", None), ("fedit-private", "fedit", "FedIT, head private", False),
                                       ("ffa-private", "ffa", "FFA-LoRA, head private", False)))
UNIFORM = (_v("fedsa-uniform", "fedsa", "FedSA-LoRA, uniform weights", weighting="uniform", tune_as="fedsa"),
           _v("fedit-private-uniform", "fedit", "FedIT, head private, uniform weights", share_head=False,
              weighting="uniform", tune_as="fedit-private"))

SHARED_CLAIMS = (tuple(Claim("1", "fedsa", o, "personal") for o in ("fedit", "ffa", "feddpa"))
                 + (Claim("bytes", "fedsa", "fedit", "acc_per_mib"),)
                 # Not a paper's claim: how much of a difference the head's protocol alone makes (same method, same lr).
                 + tuple(Claim("protocol", f"{o}-private", o, "personal") for o in ("fedit", "ffa", "feddpa")))

# SGD (the paper's) on bbc-news, where it learns at BUDGET; AdamW on both datasets: rotten-tomatoes learns only under
# AdamW at its DATASET_BUDGET (the PROBES). The blocks must fit about two hours on this machine's two idle cores.
BLOCKS = (
    Block("private-sgd", "Claim 1, the authors' protocol: every head private, SGD as in the paper",
          ("bbc-news",), "sgd", PRIVATE, CLAIM1 + (Claim("ref", "fedsa", "local", "personal"),)),
    Block("shared-sgd", "Claim 1 with the baselines' heads shared (their own defaults), SGD",
          ("bbc-news",), "sgd", SHARED, SHARED_CLAIMS, borrow=("fedsa", "local", "central")),
    Block("private-adamw", "Claim 1 under AdamW (fedlora's default), every head private",
          tuple(DATASETS), "adamw", PRIVATE, CLAIM1 + (Claim("ref", "fedsa", "local", "personal"),)),
    Block("shared-adamw", "Claim 1 with the baselines' heads shared (their own defaults), AdamW",
          ("rotten-tomatoes",), "adamw", SHARED, SHARED_CLAIMS, borrow=("fedsa", "local", "central")),
    Block("global-sgd", "Claim 3: FLoRA-NA against the methods with a global model, SGD",
          ("bbc-news",), "sgd", GLOBAL,
          (Claim("3", "flora-na", "fedit", "agg_error", higher=False),
           Claim("3", "flora-na", "fedit", "agg_error_r1", higher=False))
          + tuple(Claim("3", "flora-na", o, "global") for o in ("fedit", "fedex", "flora", "flexlora")) + CLAIM3_NEW,
          borrow=("fedit", "central")),
    Block("adapters-sgd", "Claim 1 for rsLoRA and VeRA, every head private, SGD", ("bbc-news",), "sgd",
          ADAPTER_VARIANTS,
          tuple(Claim("1", f"fedsa-{k}", f"{o}-{k}", "personal") for k in ("rslora", "vera")
                for o in ("fedit-private", "ffa-private"))),
    Block("uniform-sgd", "Claim 1 with uniform client weights (as the authors' code), every head private, SGD",
          ("bbc-news",), "sgd", UNIFORM, (Claim("1", "fedsa-uniform", "fedit-private-uniform", "personal"),),
          borrow=("fedsa", "fedit-private")),
)


# Learning curves measured at BUDGET, before DATASET_BUDGET: (dataset, optimizer, variants), tuned like a block's
# variants (every candidate lr, validation split, seed TUNE_SEED). They are why DATASET_BUDGET is what it is.
PROBES = (("rotten-tomatoes", "sgd", PRIVATE),
          ("rotten-tomatoes", "adamw", tuple(v for v in PRIVATE if v.key in ("fedsa", "central"))))

# -------------------------------------------------------------------------------------------------- configs

def budget(dataset: str, quick: bool, base: bool = False) -> tuple[str, ...]:
    """The budget of a run on ``dataset`` (``base``: BUDGET without the dataset's changes, as the probes use)."""
    return QUICK if quick else BUDGET + (() if base else DATASET_BUDGET.get(dataset, ()))


def steps_of(dataset: str, quick: bool, base: bool = False) -> int:
    """Local steps per round of a client on ``dataset``."""
    sets = dict(s.split("=", 1) for s in budget(dataset, quick, base))
    return int(sets["train.local_steps"])


def variant_overrides(v: Variant, quick: bool, steps: int) -> list[str]:
    out = [f"method.name={v.method}", f"adapter.kind={v.adapter}", f"method.weighting={v.weighting}"]
    if v.share_head is not None:
        out.append(f"method.share_head={str(v.share_head).lower()}")
    if v.central:  # one client with every training example; CLIENTS × the steps: the same examples seen in total
        out += ["data.num_clients=1", "data.partition=iid", "data.min_examples_per_client=2",
                f"train.local_steps={CLIENTS * steps}"]
    return out


def overrides(args: argparse.Namespace, dataset: str, optimizer: str, v: Variant, lr: float,
              base: bool = False) -> list[str]:
    return [*budget(dataset, args.quick, base), f"data.dataset={DATASETS[dataset]}", f"train.optimizer={optimizer}",
            f"train.lr={lr:g}", *variant_overrides(v, args.quick, steps_of(dataset, args.quick, base)), *args.overrides]


def candidates(optimizer: str, adapter: str, quick: bool) -> list[float]:
    from fedlora.registry import ADAPTERS

    scale = float(ADAPTERS.lookup(adapter).default_lr) / float(ADAPTERS.lookup("lora").default_lr)
    mults = (1.0,) if quick else MULTIPLIERS[optimizer]
    return [float(f"{REFERENCE_LR[optimizer] * scale * m:.3g}") for m in mults]


# ------------------------------------------------------------------------------------------------ running

def run_job(job: tuple[list[str], int, str]) -> str:
    """One run (a grid cell of fedlora.compare) into ``where``; skipped when already finished. A failure is
    reported and the replication goes on (the document lists the cell as missing)."""
    import traceback
    import warnings

    from fedlora import config
    from fedlora.compare import plan, run_grid

    sets, seed, where = job
    warnings.filterwarnings("ignore", category=FutureWarning)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        cfg = config.load(None, sets)
        cells = plan(cfg, [cfg.method.name], [cfg.adapter.kind], [seed])
        if cells[0].config is None:
            return f"{where} s{seed}: SKIPPED ({cells[0].reason})"
        run_grid(cells, Path(where), progress=False, echo=lambda s: None)
    except Exception:  # noqa: BLE001  (one failed run must not stop the others)
        return f"{where} s{seed}: FAILED\n{traceback.format_exc()}"
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    # CPU seconds of the run (one thread): what it takes on an idle core, whatever else shares the machine now.
    with open(Path(where) / "runs" / cells[0].name / "cost.json", "w", encoding="utf-8") as f:
        json.dump({"wall_seconds": wall, "cpu_seconds": cpu}, f)
    return f"{where} s{seed}: {wall:.0f} s ({cpu:.0f} s CPU)"


def warm_imports() -> None:
    """Import every fedlora module now. fedlora imports some modules inside functions, at first use; a long
    replication in a working tree that others edit must not load one module from before an edit and another from
    after it (an ImportError hours in). Each worker holds the code as it was when it started."""
    import importlib
    import pkgutil

    import fedlora

    for m in pkgutil.walk_packages(fedlora.__path__, "fedlora."):
        try:
            importlib.import_module(m.name)
        except ImportError:  # an optional extra (flower, tensorboard, opacus) that a run of this grid does not use
            pass


def run_jobs(jobs: list[tuple[list[str], int, str]], pool: ProcessPoolExecutor | None) -> None:
    todo = [j for j in jobs if not (Path(j[2]) / "runs" / run_name(j) / "summary.json").is_file()]
    if not todo:
        return
    print(f"  {len(todo)} runs to do ({len(jobs) - len(todo)} finished)", flush=True)
    results = pool.map(run_job, todo) if pool is not None else map(run_job, todo)
    for line in results:
        print(f"  done {line}", flush=True)


def run_name(job: tuple[list[str], int, str]) -> str:
    sets = dict(s.split("=", 1) for s in job[0])
    return f"{sets['method.name']}-{sets['adapter.kind']}-s{job[1]}"


def tune_dir(out: Path, dataset: str, optimizer: str, key: str, lr: float, probe: bool = False) -> Path:
    return out / ("probe" if probe else "tune") / dataset / optimizer / key / f"lr{lr:g}"


def main_dir(out: Path, dataset: str, optimizer: str, key: str) -> Path:
    return out / "main" / dataset / optimizer / key


def tuning_results(out: Path, dataset: str, optimizer: str, v: Variant, quick: bool,
                   probe: bool = False) -> list[tuple[float, float | None]]:
    """(lr, final mean validation accuracy over clients or None when not finished) for every candidate."""
    res = []
    for lr in candidates(optimizer, v.adapter, quick):
        summary = tune_dir(out, dataset, optimizer, v.key, lr, probe) / "runs" / \
            f"{v.method}-{v.adapter}-s{TUNE_SEED}" / "summary.json"
        res.append((lr, json.loads(summary.read_text())["acc_personal_mean"] if summary.is_file() else None))
    return res


def tuning_curve(out: Path, dataset: str, optimizer: str, v: Variant, lr: float,
                 probe: bool = False) -> list[tuple[int, float]]:
    """(round, mean validation accuracy over clients) of one tuning run, [] when not finished."""
    d = tune_dir(out, dataset, optimizer, v.key, lr, probe) / "runs" / f"{v.method}-{v.adapter}-s{TUNE_SEED}"
    if not (d / "summary.json").is_file():
        return []
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["round"], r["acc_personal_mean"]) for r in records if r.get("acc_personal_mean") is not None]


def chosen_lr(results: Sequence[tuple[float, float | None]]) -> float | None:
    """The candidate with the best validation accuracy (ties: the smaller lr); None until every candidate ran."""
    if not results or any(acc is None for _, acc in results):
        return None
    best = max(acc for _, acc in results if acc is not None)
    return min(lr for lr, acc in results if acc == best)


def tuned_variant(block: Block, v: Variant) -> Variant:
    """The variant whose lr ``v`` uses (itself unless ``tune_as``), found in any block of the same optimizer."""
    if v.tune_as is None:
        return v
    for b in BLOCKS:
        for w in b.variants:
            if w.key == v.tune_as and b.optimizer == block.optimizer:
                return w
    raise KeyError(v.tune_as)


def run_stage(args: argparse.Namespace, out: Path, block: Block, dataset: str, pool: ProcessPoolExecutor | None) -> None:
    """One block on one dataset: tune its variants' learning rates, then run its grid."""
    tune_jobs = []
    for v in block.variants:
        if v.tune_as is None:
            for lr in candidates(block.optimizer, v.adapter, args.quick):
                tune_jobs.append(([*overrides(args, dataset, block.optimizer, v, lr), *TUNING], TUNE_SEED,
                                  str(tune_dir(out, dataset, block.optimizer, v.key, lr))))
    print(f"[{block.name} · {dataset}] tuning", flush=True)
    run_jobs(tune_jobs, pool)
    jobs = []
    for seed in args.seeds:  # seed-major: a partial run has every variant on its first seeds
        for v in block.variants:
            lr = chosen_lr(tuning_results(out, dataset, block.optimizer, tuned_variant(block, v), args.quick))
            if lr is None:
                continue
            jobs.append((overrides(args, dataset, block.optimizer, v, lr), seed,
                         str(main_dir(out, dataset, block.optimizer, v.key))))
    print(f"[{block.name} · {dataset}] grid", flush=True)
    run_jobs(jobs, pool)


def run_probes(args: argparse.Namespace, out: Path, pool: ProcessPoolExecutor | None) -> None:
    """The learning curves at BUDGET (PROBES), every candidate lr of every probe variant."""
    jobs = [([*overrides(args, dataset, optimizer, v, lr, base=True), *TUNING], TUNE_SEED,
             str(tune_dir(out, dataset, optimizer, v.key, lr, probe=True)))
            for dataset, optimizer, variants in PROBES for v in variants
            for lr in candidates(optimizer, v.adapter, args.quick)]
    print("[probes] learning curves at the base budget", flush=True)
    run_jobs(jobs, pool)


def stages(blocks: Sequence[Block]) -> list[tuple[Block, str]]:
    """(block, dataset) in the order they run. Claim 1's three blocks come first, on bbc-news before
    rotten-tomatoes: bbc-news learns within the budget (the learning curves) while rotten-tomatoes' label-skewed binary
    clients have high majority floors (the floors table), so a partial replication holds the informative cells first."""
    first = [b for b in blocks if b.name in ("private-sgd", "shared-sgd", "private-adamw", "shared-adamw")]
    rest = [b for b in blocks if b not in first]
    order = sorted({d for b in first for d in b.datasets}, key=lambda d: d != "bbc-news")
    return [(b, d) for d in order for b in first if d in b.datasets] + [(b, d) for b in rest for d in b.datasets]


# ------------------------------------------------------------------------------------------------ gathering

def run_numbers(summary: dict[str, Any], records: list[dict[str, Any]]) -> cc.RunNumbers:
    errors = [r["agg_error"] for r in records if r.get("round", 0) > 0 and r.get("agg_error") is not None]
    first = [r["agg_error"] for r in records if r.get("round") == 1 and r.get("agg_error") is not None]
    return cc.RunNumbers(
        personal=summary.get("acc_personal_mean"), global_=summary.get("acc_global"),
        bytes_total=int(summary.get("bytes_up_total", 0)) + int(summary.get("bytes_down_total", 0)),
        agg_error=statistics.fmean(errors) if errors else None, agg_error_r1=first[0] if first else None,
        curve=[(r["round"], r["acc_personal_mean"]) for r in records if r.get("acc_personal_mean") is not None],
        wall=float(summary.get("wall_seconds", 0.0)))


def gather(args: argparse.Namespace, out: Path, blocks: Sequence[Block]) -> dict[tuple[str, str, str], cc.CellResult]:
    cells = {}
    for block in blocks:
        for dataset in block.datasets:
            for v in block.variants:
                lr = chosen_lr(tuning_results(out, dataset, block.optimizer, tuned_variant(block, v), args.quick))
                cell = cc.CellResult(dataset, block.optimizer, v, lr)
                for seed in args.seeds:
                    d = main_dir(out, dataset, block.optimizer, v.key) / "runs" / f"{v.method}-{v.adapter}-s{seed}"
                    if (d / "summary.json").is_file():
                        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line]
                        cell.runs[seed] = run_numbers(json.loads((d / "summary.json").read_text()), records)
                cells[(dataset, block.optimizer, v.key)] = cell
    return cells


def floors(args: argparse.Namespace, blocks: Sequence[Block]) -> dict[tuple[str, int], cc.Floors]:
    """Majority-class floors of every (dataset, seed), from the same split the runs use."""
    import numpy as np

    from fedlora import config
    from fedlora.data import load_dataset, split_federated

    out = {}
    for dataset in dict.fromkeys(d for b in blocks for d in b.datasets):
        for seed in args.seeds:
            cfg = config.load(None, [*budget(dataset, args.quick), f"data.dataset={DATASETS[dataset]}",
                                     f"data.seed={seed}"]).data
            labels = np.asarray(load_dataset(cfg).labels)
            split = split_federated(labels, cfg)
            rates = tuple(float(np.mean(labels[c.test] == np.bincount(labels[c.train]).argmax())) for c in split.clients)
            pooled = np.concatenate([c.train for c in split.clients])
            glob = float(np.mean(labels[split.global_test] == np.bincount(labels[pooled]).argmax()))
            out[(dataset, seed)] = cc.Floors(float(np.mean(rates)), glob, rates, tuple(len(c.test) for c in split.clients))
    return out


def validation_floor(dataset: str, quick: bool, central: bool = False) -> float:
    """The majority-class floor of the tuning runs' validation splits (seed TUNE_SEED), mean over clients (``central``:
    of the centralized runs' one pooled client)."""
    import numpy as np

    from fedlora import config
    from fedlora.data import load_dataset, split_federated

    pooled = [s for s in variant_overrides(PRIVATE[-1], quick, 1) if s.startswith("data.")] if central else []
    cfg = config.load(None, [*budget(dataset, quick), *TUNING, f"data.dataset={DATASETS[dataset]}",
                             f"data.seed={TUNE_SEED}", *pooled]).data
    labels = np.asarray(load_dataset(cfg).labels)
    split = split_federated(labels, cfg)
    return float(np.mean([np.mean(labels[c.test] == np.bincount(labels[c.train]).argmax()) for c in split.clients]))


def similarities(args: argparse.Namespace, out: Path, blocks: Sequence[Block]
                 ) -> dict[tuple[str, str], dict[int, cc.Similarity]]:
    """Claim 2 from the local-only runs: every client's saved adapter against the shared initialisation."""
    import math

    from safetensors.torch import load_file

    from fedlora import config
    from fedlora.analyze import layer_similarities, mean_pairwise
    from fedlora.experiment import build

    inits: dict[tuple[str, int], Any] = {}
    res: dict[tuple[str, str], dict[int, cc.Similarity]] = {}
    for block in blocks:
        if not any(v.key == "local" for v in block.variants):
            continue
        for dataset in block.datasets:
            for seed in args.seeds:
                d = main_dir(out, dataset, block.optimizer, "local") / "runs" / f"local-only-lora-s{seed}"
                if not (d / "summary.json").is_file():
                    continue
                if (dataset, seed) not in inits:  # the run's own initial adapter (its config, less data)
                    cfg = config.load(d / "config.toml", [])
                    inits[(dataset, seed)] = build(replace(cfg, data=replace(
                        cfg.data, max_examples=90, min_examples_per_client=4, validation_fraction=0.0))).init_state
                init = inits[(dataset, seed)]
                states = [load_file(str(d / "clients" / str(k) / "adapter_model.safetensors")) for k in range(CLIENTS)]
                sims = layer_similarities(states, {k: v for k, v in init.items() if k in states[0]})

                def mean(attr: str) -> float:
                    vals = [mean_pairwise(getattr(s, attr)) for s in sims]
                    return statistics.fmean(v for v in vals if not math.isnan(v))

                res.setdefault((dataset, block.optimizer), {})[seed] = cc.Similarity(
                    mean("a"), mean("b"), mean("a_change"), mean("b_change"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="where the runs go (resumable; default runs/replication, "
                                                "runs/replication-quick with --quick)")
    ap.add_argument("--doc", help="the document to write (default docs/results.md; with --quick OUT/results.md)")
    ap.add_argument("--quick", action="store_true", help="tiny-bert, tiny budget, 2 seeds, 1 lr: every code path")
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0-4; --quick: 0,1)")
    ap.add_argument("--blocks", default=None, help="comma-separated block names to run, 'probes' for the learning "
                                                   "curves at the base budget (default all)")
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel (processes of 1 thread each)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; write the document from what is done")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1] if args.quick else list(SEEDS))
    out = Path(args.out or ("runs/replication-quick" if args.quick else "runs/replication"))
    doc = Path(args.doc) if args.doc else (out / "results.md" if args.quick else Path("docs/results.md"))
    chosen = args.blocks.split(",") if args.blocks else ["probes", *(b.name for b in BLOCKS)]
    # --quick: every block on one dataset (the same code paths, fewer runs)
    blocks = tuple(replace(b, datasets=(QUICK_DATASET,)) for b in BLOCKS) if args.quick else BLOCKS
    start = time.perf_counter()
    if not args.report_only:
        pool = ProcessPoolExecutor(args.workers, initializer=warm_imports) if args.workers > 1 else None
        if pool is None:
            warm_imports()
        try:
            if "probes" in chosen:
                run_probes(args, out, pool)
            for block, dataset in stages(blocks):
                if block.name in chosen:
                    run_stage(args, out, block, dataset, pool)
        finally:
            if pool is not None:
                pool.shutdown()
    import replication_doc  # noqa: PLC0415  (benchmarks/replication_doc.py: the text)

    cells, fl, sims = gather(args, out, blocks), floors(args, blocks), similarities(args, out, blocks)
    wall = time.perf_counter() - start  # the whole invocation but writing the file
    text = replication_doc.write(rp=sys.modules[__name__], args=args, out=out, blocks=blocks, cells=cells, floors=fl,
                                 sims=sims, wall=wall, machine=machine(),
                                 command=" ".join([".venv/bin/python", "benchmarks/replication.py", *sys.argv[1:]]),
                                 date=datetime.datetime.now(datetime.timezone.utc))
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
    print(f"{doc} written ({wall / 60:.1f} min)", flush=True)


def machine() -> str:
    import torch

    from fedlora import __version__

    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"fedlora {__version__}")


if __name__ == "__main__":
    main()
