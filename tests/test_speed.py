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
def test_auto_dtype_is_bf16_only_where_the_cpu_has_bf16_units(requested: str, flags: frozenset, want: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from fedlora import models

    monkeypatch.delenv("FEDLORA_AUTO_DTYPE")  # the hardware's own answer (tests/conftest.py forces float32)
    assert models.resolve_dtype(requested, torch.device("cpu"), flags) == want


BF16_CPU = frozenset({"avx512f", "avx512_bf16"})
DP_SGD = "privacy.dp_sgd = true needs float32 (per-example gradients and their clipping in bf16 would be too coarse)"


@pytest.mark.parametrize("requested,env,flags,needs,want,reason", [
    ("auto", None, BF16_CPU, [DP_SGD], "float32", "auto chose float32 because " + DP_SGD),  # the run's needs win
    ("auto", "bfloat16", frozenset(), [DP_SGD], "float32", "auto chose float32 because " + DP_SGD),  # over env too
    ("auto", "bfloat16", frozenset({"avx2"}), [], "bfloat16", "auto chose bfloat16 because FEDLORA_AUTO_DTYPE=bfloat16"
                                                              " is set"),
    ("auto", "float32", BF16_CPU, [], "float32", "auto chose float32 because FEDLORA_AUTO_DTYPE=float32 is set"),
    ("auto", None, BF16_CPU, [], "bfloat16", "auto chose bfloat16: the device is a CPU with avx512_bf16"),
    ("auto", None, frozenset({"avx2"}), [], "float32", "auto chose float32: this cpu has no fast bf16 units (bf16 "
                                                       "would be emulated, slower than float32)"),
    ("float32", "bfloat16", BF16_CPU, [], "float32", "train.dtype = 'float32' was set explicitly"),
])
def test_auto_dtype_fits_the_run_and_says_why(requested: str, env: str | None, flags: frozenset, needs: list[str],
                                              want: str, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from fedlora import precision

    # Prepare
    if env is None:
        monkeypatch.delenv("FEDLORA_AUTO_DTYPE")
    else:
        monkeypatch.setenv("FEDLORA_AUTO_DTYPE", env)
    # Execute
    choice = precision.choose_dtype(requested, torch.device("cpu"), needs, flags)
    # Assert
    assert (choice.dtype, choice.reason) == (want, reason)


def test_a_bad_forced_auto_dtype_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from fedlora import precision
    from fedlora.errors import ConfigError

    monkeypatch.setenv("FEDLORA_AUTO_DTYPE", "fp16")
    with pytest.raises(ConfigError, match=r"environment variable FEDLORA_AUTO_DTYPE = 'fp16' is not a compute dtype; "
                                          r"use 'float32' or 'bfloat16', or unset it"):
        precision.choose_dtype("auto", torch.device("cpu"))


def test_dp_sgd_with_auto_runs_in_float32_where_auto_would_pick_bf16(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: auto's hardware answer is bf16 (as on a CPU with bf16 units); the run asks for DP-SGD and no dtype.
    import json

    from conftest import tiny_config
    from fedlora import config
    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    monkeypatch.setenv("FEDLORA_AUTO_DTYPE", "bfloat16")
    cfg = tiny_config("train.rounds=1", "train.dtype=auto", "method.name=ffa", "privacy.dp_sgd=true",
                      "privacy.noise_multiplier=0.5")
    # Execute
    simulation.run(cfg, RunDir(tmp_path / "run"), progress=False)
    # Assert: float32, and the run says why, in config.toml (a comment above the values) and summary.json.
    text = (tmp_path / "run" / "config.toml").read_text()
    assert text.splitlines()[0] == "# train.dtype = 'float32': auto chose float32 because " + DP_SGD
    assert config.load(tmp_path / "run" / "config.toml").train.dtype == "float32"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dtype"] == "float32" and summary["dtype_reason"] == "auto chose float32 because " + DP_SGD


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


def test_the_quick_throughput_benchmark_prints_the_figures_of_the_full_one() -> None:
    # Prepare: the tiny model, so that the check stays short (the README's --quick times the demo model).
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    # Execute
    out = subprocess.run([sys.executable, str(script), "--quick", "--models", "tiny-bert", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True)
    # Assert: the last line is the summary, with a measured step time in each dtype and their ratio.
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["quick"] is True and summary["threads"] == 1
    assert summary["f32_step_s"] > 0 and summary["bf16_step_s"] > 0 and summary["cpu_bf16_over_f32"] > 0
    assert summary["bf16_over_f32"] == summary["bf16_step_s"] / summary["f32_step_s"]
    assert summary["models"][0]["model"] == "tiny-bert"
    assert set(summary["matmul_peak_flop_s"]) == {"float32", "bfloat16"}


def test_the_gpu_check_runs_on_the_cpu_and_gets_the_same_result_twice() -> None:
    # Prepare: the GPU check's own CPU mode (issue 26, part 6), on the two tiny models.
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    # Execute
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--models", "tiny-llama,tiny-bert",
                          "--steps", "2", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True)
    # Assert: both models timed against the bare loop, the round reproduced, the NF4 base tried where it can be.
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["all_same_twice"] is True
    assert [r["model"] for r in summary["models"]] == ["tiny-llama", "tiny-bert"]
    assert all(r["step_ratio"] > 0 and r["records"] == 2 for r in summary["models"])
    llama, bert = summary["models"]
    assert bert["quantized"] == {"skipped": "an encoder: model.quantization takes causal LMs"}
    if importlib.util.find_spec("bitsandbytes") is None:
        assert llama["quantized"] == {"skipped": "bitsandbytes is not installed"}
    else:
        assert llama["quantized"]["finite"] is True, llama["quantized"]
