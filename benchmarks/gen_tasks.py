"""SmolLM2-135M on the seed papers' generation tasks: math-word (final-number accuracy) and python-functions
(HumanEval pass@1), before training and after a short federated run with FedIT, FedSA-LoRA and FLoRA-NA.

    .venv/bin/python benchmarks/gen_tasks.py [--tasks math-word python-functions] [--methods fedit fedsa flora-na]
                                            [--out benchmarks/results] [--set section.key=value ...]

Every measurement runs in a fresh child process: first the base model (the adapter's B = 0, so every method
starts from it) evaluated once on the task's global test set (and, for python-functions, the HumanEval subset),
then one `fedlora run` per method with `train.eval_initial = false`. Results are appended to
``<out>/gen_tasks-<task>.json`` as each one finishes, and a rerun skips what is already there (delete an entry,
or the file, to measure it again), so the script can be killed and resumed, and the two tasks can run as two
processes at once (``--tasks math-word`` and ``--tasks python-functions``). It prints the `fedlora run` command
of every run.

The settings (COMMON and SHORT below) keep the benchmark to tens of CPU minutes on one thread: 3 clients with a
Dirichlet α = 0.5 split by problem family / stdlib package, 3 rounds of 4 local steps of 4 examples, LoRA r = 8
on q_proj and v_proj, at most 128 generated tokens (the task defaults are 256 and 384); math-word: 150 problems
(30 in the global test set, about 8 in each client's test split); python-functions: 100 functions (20 from
held-out modules, about 5 per client) and 20 HumanEval problems.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

COMMON = ["model.name=smollm2", "data.max_examples=150", "data.num_clients=3", "data.partition=dirichlet",
          "data.alpha=0.5", "train.rounds=3", "train.local_steps=4", "train.batch_size=4", "train.lr=2e-3",
          "train.eval_every=3", "train.eval_initial=false", "train.eval_batch_size=16", "train.max_new_tokens=128",
          "train.threads=1"]
SHORT = {"math-word": ["data.dataset=math-word", "train.max_length=208"],
         "python-functions": ["data.dataset=python-functions", "data.max_examples=100", "train.max_length=256",
                              "data.humaneval_problems=20"]}

BASE_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from fedlora import config
from fedlora.experiment import build
t = time.perf_counter()
exp = build(config.load(None, json.loads(sys.argv[1])))
m = exp.trainer.evaluate(exp.init_state, exp.split.global_test)
out = {k: m[k] for k in ("acc", "f1", "ppl", "n") if k in m}
if "pass_at_1" in m:
    out["pass_at_1"] = m["pass_at_1"]
    out["humaneval_tasks"] = exp.task.task_ids
    out["humaneval_passed"] = [s["humaneval"] for s in m["samples"] if s.get("passed")]
out["samples"] = [s for s in m["samples"] if "example" in s]
out["seconds"] = time.perf_counter() - t
print(json.dumps(out))
"""

RUN_CHILD = r"""
import json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from fedlora import config
from fedlora.report import RunDir
from fedlora.runtime import simulation
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
summary = simulation.run(config.load(None, overrides), RunDir(out, overwrite=True), progress=False)
print(json.dumps(summary))
"""


def child(code: str, *args: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; its JSON result, with the CPU seconds it used (user + system, its
    own children included: on a shared machine these are steadier than wall time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=7200,
                          check=False)
    if proc.returncode != 0:
        sys.exit(f"child failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def save(path: Path, results: dict[str, dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def pct(x: object) -> str:
    return "—" if x is None else f"{100 * float(x):.1f}%"  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(SHORT))
    ap.add_argument("--methods", nargs="+", default=["fedit", "fedsa", "flora-na"])
    ap.add_argument("--out", default="benchmarks/results", help="folder of the results files")
    ap.add_argument("--runs", default="runs/bench-gen-tasks", help="run directories")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    for task in args.tasks:
        path = Path(args.out) / f"gen_tasks-{task}.json"
        results: dict[str, dict[str, object]] = json.loads(path.read_text()) if path.exists() else {}
        overrides = COMMON + SHORT[task] + args.overrides
        key = f"{task}/base"
        if key not in results:
            t = time.perf_counter()
            res = child(BASE_CHILD, json.dumps(overrides))
            results[key] = {**res, "wall_seconds": time.perf_counter() - t, "overrides": overrides}
            save(path, results)
        r = results[key]
        problems = len(r.get("humaneval_tasks", ()))  # type: ignore[arg-type]
        code = f", HumanEval pass@1 {pct(r.get('pass_at_1'))} on {problems} problems"
        print(f"{task} base model: acc {pct(r['acc'])} on {r['n']} test items" + (code if "pass_at_1" in r else "")
              + f" ({r['wall_seconds']:.0f} s)")
        for method in args.methods:
            key = f"{task}/{method}"
            run_overrides = overrides + [f"method.name={method}"]
            out_dir = os.path.join(args.runs, task, method)
            command = "fedlora run " + " ".join(f"--set {o}" for o in run_overrides) + f" --out {out_dir} --overwrite"
            if key not in results:
                t = time.perf_counter()
                summary = child(RUN_CHILD, json.dumps(run_overrides), out_dir)
                cpu = summary.pop("cpu_seconds")
                results[key] = {"summary": summary, "wall_seconds": time.perf_counter() - t, "cpu_seconds": cpu,
                                "command": command}
                save(path, results)
            s = results[key]["summary"]  # type: ignore[index]
            line = (f"{task} {method}: acc global {pct(s['acc_global'])}, personal {pct(s['acc_personal_mean'])}")
            if "pass_at_1_personal_mean" in s:
                line += f"; pass@1 global {pct(s['pass_at_1_global'])}, personal {pct(s['pass_at_1_personal_mean'])}"
            print(line + f" ({results[key]['wall_seconds']:.0f} s)\n  {command}")


if __name__ == "__main__":
    main()
