"""What a run leaves behind is the model it evaluated (issue 14): honest bytes, saved = evaluated, export and
re-evaluation. Tiny-bert, 2 rounds; expected byte counts are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedlora.experiment import build
from test_methods import recorded_rounds

# tiny-bert: hidden 32, 2 layers, LoRA rank 4 on query and value (4 modules), float32, 2 labels.
A_SIDE = B_SIDE = 4 * (4 * 32) * 4  # 4 modules × 128 floats × 4 bytes
HEAD = (2 * 32 + 2) * 4


rounds = recorded_rounds


# ------------------------------------------------------------------------------------------- honest bytes
def test_fedex_residual_is_sent_at_its_true_rank() -> None:
    exp, server, _, records = rounds("method.name=fedex")
    # 3 clients, r = 4: the residual has (N−1)·r = 8 columns, 8 × (32 + 32) = 512 floats per module, cheaper
    # than the dense 32 × 32 = 1024 (the stacked (N+1)·r = 16 columns would have cost 1024, i.e. dense).
    residual = 4 * 512 * 4
    per_client = A_SIDE + B_SIDE + HEAD + residual
    for record in records:
        assert record["bytes_down"] == 3 * per_client
        assert record["bytes_eval_sync"] == 0  # every client took part
    latest = server.history[-1]
    assert latest.base_update and not latest.base_update.dense
    assert all(P.shape == (32, 8) and Q.shape == (8, 32) for P, Q in latest.base_update.factored.values())


def test_evaluation_only_syncs_are_counted_apart() -> None:
    exp, _, _, records = rounds("method.name=fedit", "train.clients_per_round=1")
    broadcast = A_SIDE + B_SIDE + HEAD
    for record in records:
        assert len(record["participants"]) == 1
        # the round's broadcast reaches its participant (protocol) and the 2 others only to be evaluated;
        # each participant was brought up to date by the previous evaluation, so nothing is pending at fit
        assert record["bytes_down"] == broadcast
        assert record["bytes_eval_sync"] == 2 * broadcast


# ------------------------------------------------------------------------------------ saved = evaluated
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora import export  # noqa: E402
from fedlora.cli import main  # noqa: E402
from fedlora.report import RunDir  # noqa: E402
from fedlora.runtime import simulation  # noqa: E402

_RUNS: dict[tuple[str, ...], Path] = {}


def finished_run(tmp_path_factory: pytest.TempPathFactory, *overrides: str) -> Path:
    """A finished tiny run (cached per set of overrides for this test session)."""
    if overrides not in _RUNS:
        path = tmp_path_factory.mktemp("run") / "run"
        simulation.run(tiny_config(*overrides), RunDir(path), progress=False)
        _RUNS[overrides] = path
    return _RUNS[overrides]


SAVED_CASES = [("fedit", "lora"), ("ffa", "lora"), ("fedsa", "lora"), ("flora-na", "lora"), ("fedex", "lora"),
               ("flora", "lora"), ("fedex", "rslora"), ("flora", "rslora"), ("fedit", "vera"), ("fedsa", "vera"),
               ("feddpa", "lora"), ("rolora", "lora"), ("fedsvd", "lora"), ("lora-fair", "lora"), ("flexlora", "lora"),
               ("local-only", "lora"), ("fedrot", "lora"), ("fed-sb", "lora-sb")]


@pytest.mark.parametrize("method,adapter", SAVED_CASES)
def test_saved_models_reproduce_the_last_evaluation(tmp_path_factory, method: str, adapter: str) -> None:
    run = finished_run(tmp_path_factory, f"method.name={method}", f"adapter.kind={adapter}")
    summary = json.loads((run / "summary.json").read_text())
    for client in (None, 0, 2):
        if client is None and summary["acc_global"] is None:
            with pytest.raises(export.FedloraError, match="has no global model"):
                export.evaluate(run, None)
            continue
        result = export.evaluate(run, client)
        assert result["reproduced"], result
        want = summary["acc_global"] if client is None else summary["clients"][str(client)]
        assert result["metrics"]["acc"] == want
        if client is None:  # the loss, to all its digits: a model that differs anywhere would show here
            assert result["metrics"]["loss"] == result["recorded"]["loss"]
    changed = method in ("fedex", "flora")
    for folder in [run / "clients" / "0"] + ([run / "global"] if summary["acc_global"] is not None else []):
        assert (folder / export.BASE_FILE).is_file() == changed


def test_every_builtin_method_is_checked_for_saved_equals_evaluated() -> None:
    from fedlora.registry import METHODS

    builtin = {name for name, cls in METHODS.items() if cls.__module__.startswith("fedlora.methods.")}
    assert builtin <= {m for m, _ in SAVED_CASES}, "add the new method to SAVED_CASES"


def test_flora_learning_is_in_the_saved_base_weights(tmp_path_factory) -> None:
    run = finished_run(tmp_path_factory, "method.name=flora", "adapter.kind=lora")
    adapter = load_file(str(run / "global" / "adapter_model.safetensors"))
    assert all(not v.any() for k, v in adapter.items() if "lora_B" in k)  # merged: the adapter is fresh
    saved = export.load_saved(run)
    cfg = export._run_config(run)
    without = PeftModel.from_pretrained(export._base_model(cfg, ("rotten", "fresh")), str(run / "global"))
    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])}
    with torch.no_grad():
        a, b = saved(**batch).logits, without.eval()(**batch).logits
        c = export.load_saved(run, client=1)(**batch).logits
    assert not torch.allclose(a, b)  # the federated training lives in base_weights.safetensors
    assert torch.equal(a, c)  # after the last broadcast every FLoRA client holds the global model


# ------------------------------------------------------------------------------------------ export / evaluate
PLAIN_LOAD = """
import json, sys, torch, transformers, peft
torch.set_num_threads(1)
out = {}
for kind, path in (("merged", sys.argv[1]), ("adapter", sys.argv[2])):
    if kind == "merged":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path)
    else:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(path + "/base")
        model = peft.PeftModel.from_pretrained(base, path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out[kind] = model.eval()(**tok(["a fresh and funny film", "dull"], padding=True, return_tensors="pt")).logits.tolist()
assert not any(m.startswith("fedlora") for m in sys.modules), "fedlora was imported"
print(json.dumps(out))
"""


def test_export_loads_with_plain_transformers_and_peft(tmp_path_factory, tmp_path: Path) -> None:
    run = finished_run(tmp_path_factory, "method.name=fedex", "adapter.kind=lora")
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert export.export(run, None, merged, merged=True)["base_weights_changed"]
    export.export(run, None, adapter)
    assert (merged / "config.json").is_file() and (adapter / "base" / "config.json").is_file()
    assert_plain_loads_give_the_saved_logits(run, merged, adapter)


def assert_plain_loads_give_the_saved_logits(run: Path, merged: Path, adapter: Path) -> None:
    """A fresh process loads the merged model (plain transformers) and the adapter (plain PEFT); both give the
    logits of fedlora's own reload of the run's saved global model."""
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(merged), str(adapter)], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    got = {k: torch.tensor(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    from fedlora import models

    tok = models.load_tokenizer(export._run_config(run).model)
    with torch.no_grad():
        want = export.load_saved(run)(**tok(["a fresh and funny film", "dull"], padding=True,
                                            return_tensors="pt")).logits
    torch.testing.assert_close(got["adapter"], want, rtol=0, atol=1e-6)  # the same weights, unmerged
    torch.testing.assert_close(got["merged"], want, rtol=1e-4, atol=1e-5)  # merging rounds in float32


def test_evaluate_an_exported_directory_and_a_new_file(tmp_path_factory, tmp_path: Path) -> None:
    run = finished_run(tmp_path_factory, "method.name=fedex", "adapter.kind=lora")
    export.export(run, None, tmp_path / "adapter")
    saved = export.evaluate(run, None)
    exported = export.evaluate(run, None, model_dir=tmp_path / "adapter")
    assert exported["metrics"]["acc"] == saved["metrics"]["acc"] and exported["reproduced"]
    # the global test set written to a csv of its own: the same examples in the same order give the same metrics

    exp = build(export._run_config(run))
    rows = ["text,label"] + ['"{}",{}'.format(exp.dataset.texts[i].replace('"', '""'),
                                              exp.dataset.label_names[exp.dataset.labels[i]])
                             for i in exp.split.global_test]
    (tmp_path / "new.csv").write_text("\n".join(rows) + "\n")
    on_file = export.evaluate(run, None, data_file=tmp_path / "new.csv")
    assert on_file["metrics"] == saved["metrics"] and "reproduced" not in on_file
    (tmp_path / "odd.csv").write_text("text,label\ngreat,fresh\nbad,meh\n")
    with pytest.raises(export.FedloraError, match=r"labels the run does not know: \['meh'\]"):
        export.evaluate(run, None, data_file=tmp_path / "odd.csv")


def test_cli_export_refuses_global_without_a_global_model_and_evaluate_prints_json(
        tmp_path_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = finished_run(tmp_path_factory, "method.name=fedsa", "adapter.kind=lora")
    assert main(["export", str(run), "--global", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "method 'fedsa' has no global model" in err and "--client K" in err and not (tmp_path / "x").exists()
    assert main(["evaluate", str(run), "--client", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reproduced"] and result["model"] == "client 1"
    assert main(["evaluate", str(run), "--client", "7"]) == 2
    assert "the run has clients 0..2" in capsys.readouterr().err


def test_a_private_head_means_no_global_model_to_export(tmp_path: Path) -> None:
    cfg = tiny_config("method.name=fedit", "method.share_head=false")
    assert "the classification head is private" in export.global_refusal(cfg)
    assert export.global_refusal(tiny_config("method.name=fedex")) is None


# ------------------------------------------------------------------------- the FLoRA-NA paper's estimator

from fedlora import functional as F  # noqa: E402
from fedlora.errors import ConfigError  # noqa: E402


def _paper_layers(n: int = 3, r: int = 2, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    layers = []
    for d, k in ((12, 9), (7, 10)):  # two layers of different shapes share the scalars
        Bg, Ag = torch.randn(d, r, generator=g, dtype=torch.float64) * 0.1, torch.randn(r, k, generator=g,
                                                                                         dtype=torch.float64)
        Bs = [Bg + 0.1 * torch.randn(d, r, generator=g, dtype=torch.float64) for _ in range(n)]
        As = [Ag + 0.5 * torch.randn(r, k, generator=g, dtype=torch.float64) for _ in range(n)]
        layers.append((Bs, As, Bg, Ag))
    return layers


def _dense_paper_reference(layers, p, steps, lr, wd):  # type: ignore[no-untyped-def]
    """The authors' loop written out on dense d×k matrices: U, V start at 1, AdamW, one loss over all layers."""
    n = len(p)
    p = torch.tensor(p, dtype=torch.float64) / sum(p)
    U = torch.ones(n, dtype=torch.float64, requires_grad=True)
    V = torch.ones(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([U, V], lr=lr, weight_decay=wd)

    def estimates():  # type: ignore[no-untyped-def]
        return [(Bg + sum(p[u] * V[u] * (Bs[u] - Bg) for u in range(n)),
                 Ag + sum(p[u] * U[u] * (As[u] - Ag) for u in range(n))) for Bs, As, Bg, Ag in layers]

    ideals = [sum(p[u] * Bs[u] @ As[u] for u in range(n)) for Bs, As, _, _ in layers]
    norm = sum(float((w ** 2).sum()) for w in ideals)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((w - B @ A) ** 2).sum() for w, (B, A) in zip(ideals, estimates())) / norm
        loss.backward()
        opt.step()
    return [(B.detach(), A.detach()) for B, A in estimates()]


@pytest.mark.parametrize("steps,lr,wd", [(0, 1e-2, 0.01), (200, 1e-2, 0.01), (50, 0.1, 0.0)])
def test_paper_estimator_matches_the_authors_loop_written_densely(steps: int, lr: float, wd: float) -> None:
    layers, p = _paper_layers(), [1.0, 2.0, 3.0]
    got = F.flora_na_paper(layers, p, steps=steps, lr=lr, weight_decay=wd)
    want = _dense_paper_reference(layers, p, steps, lr, wd)
    for (B, A), (Bw, Aw) in zip(got, want):
        torch.testing.assert_close(B, Bw, rtol=0, atol=1e-9)
        torch.testing.assert_close(A, Aw, rtol=0, atol=1e-9)
    if steps == 0:  # U = V = 1 anchored on the global factors is FedIT's point
        for (Bs, As, _, _), (B, A) in zip(layers, got):
            B_bar, A_bar = F.fedit(Bs, As, p)
            torch.testing.assert_close(B, B_bar, rtol=0, atol=1e-12)
            torch.testing.assert_close(A, A_bar, rtol=0, atol=1e-12)


def test_paper_estimator_depends_on_the_global_factors_and_shares_its_scalars() -> None:
    layers, p = _paper_layers(), [1.0, 2.0, 3.0]
    shifted = [(Bs, As, Bg + 0.05, Ag) for Bs, As, Bg, Ag in layers]
    a = F.flora_na_paper(layers, p)
    b = F.flora_na_paper(shifted, p)
    assert not torch.allclose(a[0][0], b[0][0])  # the anchor moves the estimate (a plain mix would not move)
    # one set of scalars: (B̂ − B_g) of every layer is the same combination of that layer's ΔB_u
    coef = []
    for (Bs, _, Bg, _), (B, _) in zip(layers, a):
        D = torch.stack([(Bu - Bg).reshape(-1) for Bu in Bs], dim=1)
        coef.append(torch.linalg.lstsq(D, (B - Bg).reshape(-1, 1)).solution.reshape(-1))
    torch.testing.assert_close(coef[0], coef[1], rtol=0, atol=1e-9)


def test_paper_estimator_refuses_bad_input() -> None:
    layers = _paper_layers()
    with pytest.raises(ValueError, match="layer 0 must be"):
        F.flora_na_paper([layers[0][:3]], [1, 1, 1])
    with pytest.raises(ValueError, match="layer 1: length mismatch: 3 weights for 2 clients"):
        F.flora_na_paper([layers[0], (layers[1][0][:2], layers[1][1][:2], layers[1][2], layers[1][3])], [1, 1, 1])
    with pytest.raises(ValueError, match="lr must be a positive number"):
        F.flora_na_paper(layers, [1, 1, 1], lr=0)


def test_na_estimator_names() -> None:
    exp, _, _, records = rounds("method.name=flora-na", "method.na_estimator=paper", n=1)
    assert records[0]["agg_error"] > 0
    with pytest.raises(ConfigError, match=r"method.na_estimator = 'coefficients' is not allowed; choose one of: "
                                          r"svd, paper, layer-mix"):
        tiny_config("method.name=flora-na", "method.na_estimator=coefficients")
