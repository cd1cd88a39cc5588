"""Tests of the performance features: a light CLI, the compute dtype, bf16 storage, evaluation.

They check behaviour only (what is imported, which dtype is chosen and stored, that results are exact or
deterministic); timings belong in ``benchmarks/throughput.py`` and ``benchmarks/aggregation.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# numpy is not listed: dataset plugins (listed by `fedlora methods`) import it, and it loads in ~0.1 s.
HEAVY = ("torch", "transformers", "peft", "sklearn", "flwr")


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["config", "--keys"]])
def test_quick_commands_import_no_heavy_library(argv: list[str]) -> None:
    # Prepare: a fresh interpreter runs the command's entry point, then reports which heavy modules it loaded.
    code = ("import json, sys\nfrom fedlora.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert: the command printed its answer and loaded none of them.
    lines = out.stdout.strip().splitlines()
    assert len(lines) > 3, out.stdout
    assert json.loads(lines[-1]) == []


def test_lazy_package_attributes_still_resolve() -> None:
    import fedlora

    assert "fedsa" in fedlora.METHODS
    assert fedlora.get_method("fedit").name == "fedit"
    assert callable(fedlora.functional.flora_na)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedlora.nope  # noqa: B018


# ---------------------------------------------------------------------------------------- compute dtype



@pytest.mark.parametrize("requested,flags,want", [
    ("auto", frozenset({"avx2", "fma"}), "float32"),  # AVX2 only: bf16 is emulated, slower than float32
    ("auto", frozenset({"avx512f", "amx_bf16", "amx_tile"}), "bfloat16"),  # AMX (Sapphire Rapids)
    ("auto", frozenset({"avx512f", "avx512_bf16"}), "bfloat16"),  # AVX512-BF16 (Cooper Lake, Zen 4)
    ("float32", frozenset({"amx_bf16"}), "float32"),  # an explicit choice is kept
    ("bfloat16", frozenset({"avx2"}), "bfloat16"),
])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_bf16_units(requested: str, flags: frozenset, want: str) -> None:
    import torch

    from fedlora import models

    assert models.resolve_dtype(requested, torch.device("cpu"), flags) == want


@pytest.mark.parametrize("dtype,want", [("bfloat16", "eager"), ("float32", "sdpa")])
def test_auto_attention_follows_the_measured_table(dtype: str, want: str) -> None:
    import torch

    from fedlora import models

    assert models.resolve_attention("auto", torch.device("cpu"), dtype) == want
    assert models.resolve_attention("sdpa", torch.device("cpu"), dtype) == "sdpa"  # explicit wins


def test_resolved_dtype_and_attention_are_written_to_config_toml(tmp_path) -> None:
    import torch

    from conftest import tiny_config
    from fedlora import config, models
    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    simulation.run(tiny_config("train.rounds=1", "train.dtype=auto"), RunDir(tmp_path / "run"), progress=False)
    saved = config.load(tmp_path / "run" / "config.toml")
    assert saved.train.dtype == models.resolve_dtype("auto", torch.device("cpu"))  # never "auto" in a run
    assert saved.train.attention == models.resolve_attention("auto", torch.device("cpu"), saved.train.dtype)


@pytest.mark.parametrize("method", ["fedsa", "fedex"])
def test_bf16_stores_frozen_base_in_bf16_and_trains_float32_adapters(method: str) -> None:
    import torch

    from conftest import tiny_config
    from fedlora.experiment import build

    exp = build(tiny_config("train.dtype=bfloat16", f"method.name={method}"))
    assert exp.config.train.dtype == "bfloat16" and exp.config.train.attention == "eager"
    slots = {id(p) for p in exp.slots.values()}
    changed = {meta.base_param for meta in exp.info.layers.values()}
    for name, p in exp.model.named_parameters():
        if id(p) in slots:
            want = torch.float32  # adapters and head: trained, with float32 optimizer state
        elif name in changed and exp.method.changes_base:
            want = torch.float32  # FedEx merges residuals into these: their own float32 master
        else:
            want = torch.bfloat16
        assert p.dtype == want, name
    result = exp.trainer.train(exp.init_state, exp.clients[0], 1)
    assert {t.dtype for t in result.state.values()} == {torch.float32}
    assert result.state.keys() == exp.init_state.keys()
    assert any(not torch.equal(result.state[k], exp.init_state[k]) for k in result.state)  # it learned something


def test_small_base_merges_accumulate_exactly_in_the_float32_master() -> None:
    import torch

    from conftest import tiny_config
    from fedlora.experiment import build
    from fedlora.protocol import BaseUpdate
    from fedlora.runtime.driver import apply_base_update

    exp = build(tiny_config("train.dtype=bfloat16", "method.name=fedex"))
    name = next(iter(exp.info.layers.values())).base_param
    weight = dict(exp.model.named_parameters())[name]
    w0 = weight.detach().clone()
    # 1000 merges, each 1e-4 of the weights' scale: far below bf16's resolution (2^-8 relative), so a bf16
    # weight would round every one of them away; the float32 master keeps their sum (0.1 × scale).
    delta = torch.full_like(w0, 1e-4 * float(w0.abs().mean()))
    for _ in range(1000):
        apply_base_update(exp.model, BaseUpdate(dense={name: delta}))
    torch.testing.assert_close(weight.detach() - w0, 1000 * delta, rtol=1e-3, atol=0)
    naive = w0.to(torch.bfloat16)
    for _ in range(1000):
        naive += delta.to(torch.bfloat16)
    naive_sum = naive.float() - w0.to(torch.bfloat16).float()
    lost = float((naive_sum - 1000 * delta).norm() / (1000 * delta).norm())
    assert lost > 0.5  # what a bf16 base would have kept: most of the merged update gone


def test_bf16_runs_are_deterministic() -> None:
    from conftest import tiny_config
    from fedlora.runtime import simulation

    cfg = tiny_config("train.dtype=bfloat16", "method.name=fedex")
    first, second = (simulation.run(cfg, None, progress=False) for _ in range(2))
    for key in ("acc_global", "acc_personal_mean", "bytes_up_total"):
        assert first[key] == second[key]


def test_evaluation_sorts_by_length_and_returns_predictions_in_the_given_order() -> None:
    import numpy as np
    import torch

    from conftest import tiny_config
    from fedlora.experiment import build

    exp = build(tiny_config("train.dtype=float32"))
    task, idx = exp.task, exp.split.global_test
    assert len(set(task._lengths[idx])) > 1  # examples of several lengths, so sorting matters
    exp.trainer.load(exp.init_state)
    batched, loss = task.predict(exp.model, idx, 16, exp.device)
    single = np.array([task.predict(exp.model, idx[i:i + 1], 1, exp.device)[0][0] for i in range(len(idx))])
    assert (batched == single).all()  # padding to each batch's longest example changes no prediction
    shuffled = np.random.default_rng(0).permutation(len(idx))
    again, loss_again = task.predict(exp.model, idx[shuffled], 16, exp.device)
    assert (again == batched[shuffled]).all() and loss_again == pytest.approx(loss, rel=1e-5)
    with torch.inference_mode():
        assert exp.trainer.evaluate(exp.init_state, idx)["n"] == len(idx)
