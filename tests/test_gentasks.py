"""math-word and python-functions: the generator, the stdlib extraction, final-number matching, the HumanEval
sandbox (contained failures), and both tasks end to end on tiny-llama."""

from __future__ import annotations

import json
import re
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_flower import loopback_run, records

from fedlora import config
from fedlora.config import DataConfig
from fedlora.data import pyfunctions
from fedlora.data.instructions import load_instruction_dataset
from fedlora.data.mathword import FAMILIES, STEP_LABELS, answers_match, final_number, generate, math_word
from fedlora.errors import ConfigError, DataError
from fedlora.humaneval import completion_for, load_problems, program_for, run_all, select
from fedlora.sandbox import Limits, run_program

FAST = Limits(timeout_s=2.0)

# ---- math-word ------------------------------------------------------------------------------------------------

_EQUATION = re.compile(r"((?:\d+ [-+*/] )+\d+) = \$?(\d+)")


def _left_to_right(expr: str) -> float:
    """The value of "a op b op c" computed left to right (each generated line uses one precedence level)."""
    tokens = expr.split()
    value = float(tokens[0])
    for op, x in zip(tokens[1::2], tokens[2::2]):
        value = {"+": value + float(x), "-": value - float(x), "*": value * float(x)}.get(op, value) \
            if op != "/" else value / float(x)
    return value


def test_math_word_solutions_are_correct_and_sized() -> None:
    problems = generate(500, seed=3, stream=0)
    assert len({q for q, _, _ in problems}) == 500  # distinct questions
    assert {f for _, _, f in problems} == set(range(len(FAMILIES)))
    for question, solution, _ in problems:
        lines = solution.splitlines()
        assert lines[-1].startswith("#### ") and int(lines[-1][5:]) >= 0
        equations = [eq for line in lines[:-1] for eq in _EQUATION.findall(line)]
        assert equations, solution
        for lhs, rhs in equations:  # every worked step is right
            assert _left_to_right(lhs) == int(rhs), (question, solution)
        operations = sum(len(lhs.split()) // 2 for lhs, _ in equations)
        assert 2 <= operations <= 5, solution
        assert int(final_number(solution)) == int(lines[-1][5:])


def test_math_word_test_problems_are_generated_apart() -> None:
    cfg = DataConfig(dataset="math-word", max_examples=200, test_fraction=0.25, seed=1)
    ds = math_word(cfg)
    assert len(ds) == 200 and len(ds.held_out) == 50
    train = set(np.setdiff1d(np.arange(200), ds.held_out))
    assert not {ds.inputs[i] for i in train} & {ds.inputs[i] for i in ds.held_out}
    assert math_word(cfg).inputs == ds.inputs  # same seed, same problems
    assert math_word(replace(cfg, seed=2)).inputs != ds.inputs
    # More training problems leave the test problems as they were: they come from their own stream.
    bigger = math_word(replace(cfg, max_examples=400, test_fraction=0.125))
    assert [bigger.inputs[i] for i in bigger.held_out] == [ds.inputs[i] for i in ds.held_out]


@pytest.mark.parametrize("generation, reference, match", [
    ("So the answer is 42.", "x\n#### 42", True),
    ("#### 1,000", "#### 1000", True),
    ("It costs $18.0 in total", "#### 18", True),
    ("#### 7\nwait, maybe 8", "#### 7", True),  # the number after ####, not the last one
    ("5-3 leaves 2", "#### 2", True),
    ("5 - 3", "#### -3", False),  # a minus glued to a digit before it is subtraction, not a sign
    ("the answer is -4", "#### -4", True),
    ("I do not know", "#### 4", False),
    ("#### 41", "#### 42", False),
])
def test_final_number_match(generation: str, reference: str, match: bool) -> None:
    assert answers_match(generation, reference) is match


def test_gsm8k_file(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
            {"question": "Q2?", "answer": "a\nb\nc\n#### 1,200"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_instruction_dataset(DataConfig(dataset="math-word", path=str(path), max_examples=0))
    assert ds.inputs == (rows[0]["question"], rows[1]["question"])
    assert [ds.label_names[i] for i in ds.labels] == [STEP_LABELS[0], STEP_LABELS[2]] and ds.held_out is None
    path.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: the answer must end with '#### <number>'"):
        load_instruction_dataset(DataConfig(dataset="math-word", path=str(path)))


# ---- python-functions -----------------------------------------------------------------------------------------

_MODULE = '''
def area(w, h):
    """Area of a rectangle."""
    check(w)
    return w * h


def _private(x):
    """Skipped: private."""
    y = x
    return y


def nodoc(x):
    y = x
    return y


def trivial(x):
    """Skipped: one statement."""
    return x


class Shape:
    @property
    def size(self):
        """The size."""
        n = len(self.parts)
        return n
'''


def _fake_stdlib(root: Path) -> Path:
    (root / "geometry").mkdir(parents=True)
    (root / "geometry" / "__init__.py").write_text(_MODULE)
    (root / "geometry" / "copy.py").write_text(_MODULE.split("def _private")[0])  # the same body again: dropped
    (root / "token.py").write_text('"""Auto-generated by a script. Do not edit."""\n' + _MODULE)
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text(_MODULE)
    (root / "textutil.py").write_text('def shout(s):\n    """Upper case, with a bang."""\n    s = s.upper()\n'
                                      '    return s + "!"\n')
    return root


def test_python_functions_extraction(tmp_path: Path) -> None:
    fns = pyfunctions.extract(str(_fake_stdlib(tmp_path)))
    assert [(f.module, f.name) for f in fns] == [("geometry", "area"), ("geometry", "size"), ("textutil", "shout")]
    area, size = fns[0], fns[1]
    assert area.prompt == 'def area(w, h):\n    """Area of a rectangle."""\n'
    assert area.body == "    check(w)\n    return w * h\n"
    assert size.prompt.startswith("@property\ndef size(self):") and size.package == "geometry"
    ds = pyfunctions.python_functions(DataConfig(dataset="python-functions", max_examples=0, test_fraction=0.3),
                                      root=str(tmp_path))
    test_modules = {fns[i].module for i in range(len(fns)) if ds.inputs.index(fns[i].prompt) in set(ds.held_out)}
    train_modules = {f.module for f in fns if ds.inputs.index(f.prompt) not in set(ds.held_out)}
    assert test_modules and train_modules and not test_modules & train_modules  # held out by whole module
    assert set(ds.label_names) == {"geometry", "textutil"}


# ---- the sandbox and HumanEval --------------------------------------------------------------------------------


def test_sandbox_passes_and_fails() -> None:
    assert run_program("assert sum([1, 2]) == 3\n", FAST).passed
    assert run_program("assert sum([1, 2]) == 4\n", FAST).status == "failed"
    assert run_program("import sys\nsys.exit(0)\nassert False\n", FAST).status == "no-token"


def test_sandbox_contains_a_file_write(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    outcome = run_program(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    assert not outcome.passed and "sandbox" in outcome.detail
    assert not target.exists()
    assert run_program("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n", FAST).passed


def test_sandbox_contains_a_socket() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
        assert run_program(program, FAST).status == "failed"
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected


def test_sandbox_kills_an_endless_loop() -> None:
    assert run_program("while True:\n    pass\n", Limits(timeout_s=1.0)).status == "timeout"


def test_sandbox_bounds_endless_output() -> None:
    outcome = run_program("while True:\n    print('x' * 1000)\n", Limits(timeout_s=5.0, file_mb=1))
    assert outcome.status == "failed" and "File too large" in outcome.detail


def test_humaneval_programs() -> None:
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    chosen = select(problems, 4, seed=0)
    assert [p["task_id"] for p in chosen] == [p["task_id"] for p in select(problems, 4, seed=0)]
    assert [p["task_id"] for p in chosen] != [p["task_id"] for p in select(problems, 4, seed=1)]
    p = problems[2]  # truncate_number: return number % 1.0
    whole = f"Sure!\n```python\n{p['prompt']}{p['canonical_solution']}\nprint(truncate_number(3.5))\n```\nDone."
    assert "print(" not in completion_for(p, whole)
    assert completion_for(p, "return number % 1.0\n\ndef helper():\n    pass") == "    return number % 1.0\n\n"
    generations = [c["canonical_solution"] for c in chosen] + [whole, "    return 0.0\n",
                   "    open('/tmp/fedlora-humaneval-pwned', 'w')\n    return number % 1.0\n",
                   "    while True:\n        pass\n"]
    outcomes = run_all([program_for(q, g) for q, g in zip(chosen + [p] * 4, generations)], FAST)
    assert [o.status for o in outcomes] == ["passed"] * 5 + ["failed", "failed", "timeout"]
    assert not Path("/tmp/fedlora-humaneval-pwned").exists()


# ---- configuration and end to end on tiny-llama ----------------------------------------------------------------


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="python-functions' does not read data.path"):
        config.load(None, ["data.dataset=python-functions", "data.path=x.jsonl"])
    with pytest.raises(ConfigError, match="needs a causal language model"):
        config.load(None, ["data.dataset=math-word"]).resolved()  # minilm is an encoder
    with pytest.raises(ConfigError, match="generation task"):
        config.load(None, ["data.dataset=math-word", "data.task=classification"])


TINY = ["model.name=tiny-llama", "data.num_clients=3", "data.min_examples_per_client=4", "train.rounds=1",
        "train.local_steps=1", "train.batch_size=4", "train.threads=1", "train.eval_batch_size=16"]


def test_math_word_end_to_end(tmp_path: Path) -> None:
    from fedlora.experiment import build
    from fedlora.report import RunDir
    from fedlora.runtime import simulation
    from fedlora.tasks_gen import build_task

    cfg = config.load(None, TINY + ["data.dataset=math-word", "data.max_examples=60", "train.max_length=192",
                                    "train.max_new_tokens=6", "method.name=flora-na"])
    exp = build(cfg)
    assert np.array_equal(exp.split.global_test, exp.dataset.held_out)  # the generated test problems
    assert exp.task.max_new_tokens == 6 and exp.task.match is answers_match
    default = replace(exp.config, train=replace(exp.config.train, max_new_tokens=0))
    assert build_task(exp.dataset, exp.task.tokenizer, default, True).max_new_tokens == 256  # the task's default
    summary = simulation.run(cfg, RunDir(tmp_path / "run"), progress=False, exp=exp)
    assert summary["acc_global"] is not None and 0.0 <= summary["acc_personal_mean"] <= 1.0
    assert "pass_at_1_global" not in summary


def _small_stdlib(root: Path) -> Path:
    """The fake standard library plus 24 small functions in 12 modules of 4 packages: enough for 3 clients."""
    _fake_stdlib(root)
    for i in range(12):
        (root / f"pkg{i % 4}").mkdir(exist_ok=True)
        (root / f"pkg{i % 4}" / f"mod{i}.py").write_text(
            f'def f{i}(x):\n    """Add {i}."""\n    y = x + {i}\n    return y\n\n\n'
            f'def g{i}(x):\n    """Times {i}."""\n    y = x * {i}\n    return y\n')
    return root


def test_python_functions_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    root = _small_stdlib(tmp_path / "stdlib")
    monkeypatch.setattr(pyfunctions, "stdlib_root", lambda: root)
    cfg = config.load(None, TINY + ["data.dataset=python-functions", "data.max_examples=0", "train.max_length=128",
                                    "train.max_new_tokens=4", "data.humaneval_problems=2", "method.name=fedsa"])
    summary = simulation.run(cfg, RunDir(tmp_path / "run"), progress=False)
    assert summary["pass_at_1_global"] is None  # FedSA-LoRA has no global model
    assert summary["pass_at_1_personal_mean"] == 0.0 and set(summary["pass_at_1_clients"]) == {"0", "1", "2"}
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "round_1.jsonl").open()]
    tried = [s for s in samples if "humaneval" in s]
    assert len(tried) == 3 * 2 and all(not s["passed"] for s in tried)
    assert {s["humaneval"] for s in tried} == {p["task_id"] for p in select(load_problems(), 2, seed=0)}


def test_python_functions_on_flower_matches_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Message() needs them (test_flower)

    root = _small_stdlib(tmp_path / "stdlib")
    monkeypatch.setattr(pyfunctions, "stdlib_root", lambda: root)
    cfg = config.load(None, TINY + ["data.dataset=python-functions", "data.max_examples=0", "train.max_length=128",
                                    "train.max_new_tokens=4", "data.humaneval_problems=2", "method.name=fedit"])
    simulation.run(cfg, RunDir(tmp_path / "embedded"), progress=False)
    loopback_run(cfg, tmp_path / "flower")
    a, b = records(tmp_path / "embedded"), records(tmp_path / "flower")
    assert a[-1]["pass_at_1_global"] == 0.0 and set(a[-1]["pass_at_1_clients"]) == {"0", "1", "2"}
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in b]
