"""Hugging Face Hub model ids (issue 25): a model named ``org/name`` is found in the user's Hugging Face cache the
ordinary way (huggingface_hub), at the commit its revision names; runs, resumes, exports and evaluations use it by
id, and its saved adapters name it as their base model. The cache is built here in a temporary HF_HOME, in the
Hub's own layout (``models--org--name/snapshots/<commit>/``, ``refs/main``), from the tiny models; HF_HUB_OFFLINE=1
(conftest), except in the tests that talk to a fake Hub on the loopback interface."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import huggingface_hub.constants
import pytest
import torch

from conftest import RESUMABLE, assert_same_run, interrupted_and_resumed, tiny_config
from fedlora import config, export, hub, models
from fedlora.cli import main
from fedlora.errors import ConfigError, ModelError
from fedlora.report import RunDir
from fedlora.runtime import simulation

BERT, LLAMA, ODD = "fedlora-test/tiny-bert", "fedlora-test/tiny-llama", "fedlora-test/tiny-distilbert"
ROBERTA = "fedlora-test/tiny-roberta"
MAIN = "0123456789abcdef0123456789abcdef01234567"  # the commit refs/main points to
OLD = "fedcba9876543210fedcba9876543210fedcba98"  # an older commit of tiny-bert, reached by revision only


def _clear_caches() -> None:
    hub._hub_config.cache_clear()
    models.load_tokenizer.cache_clear()
    models._pretrained.cache_clear()


def _snapshot(hub_dir: Path, repo: str, commit: str, is_main: bool) -> Path:
    repo_dir = hub_dir / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    if is_main:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Hugging Face cache holding tiny-bert (two commits), tiny-llama, a tiny RoBERTa (random weights, MiniLM's
    tokenizer) and a DistilBERT config, as HF_HOME."""
    from transformers import DistilBertConfig, RobertaConfig, RobertaForMaskedLM

    home = tmp_path_factory.mktemp("hf_home")
    for commit, is_main, seed in ((MAIN, True, 0), (OLD, False, 1)):
        snap = _snapshot(home / "hub", BERT, commit, is_main)
        models.load_classifier(config.ModelConfig("tiny-bert"), 2, seed=seed).save_pretrained(snap)
        models.load_tokenizer(config.ModelConfig("tiny-bert")).save_pretrained(snap)
    snap = _snapshot(home / "hub", LLAMA, MAIN, True)
    models.load_causal_lm(config.ModelConfig("tiny-llama"), seed=0).save_pretrained(snap)
    models.load_tokenizer(config.ModelConfig("tiny-llama")).save_pretrained(snap)
    snap = _snapshot(home / "hub", ROBERTA, MAIN, True)
    tokenizer = models.load_tokenizer(config.ModelConfig("tiny-bert"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, type_vocab_size=2,
                                         max_position_embeddings=130)).save_pretrained(snap)
    tokenizer.save_pretrained(snap)
    # DistilBERT: a model type PEFT has no default target modules for (its config is all resolution reads).
    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(_snapshot(home / "hub", ODD,
                                                                                              MAIN, True))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HF_HOME", str(home))
        m.delenv("HF_TOKEN", raising=False)
        # huggingface_hub reads HF_HOME when it is imported; these are what it and transformers look at per call.
        m.setattr(huggingface_hub.constants, "HF_HOME", str(home))
        m.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
        m.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
        _clear_caches()
        yield home
    _clear_caches()


def test_a_hub_id_resolves_to_its_commit_and_its_kind_from_its_config(hf_home: Path) -> None:
    bert = tiny_config(f"model.name={BERT}").resolved()
    assert (bert.model.revision, bert.model.causal, bert.adapter.targets) == (MAIN, False, ("query", "value"))
    assert tiny_config(f"model.name={BERT}", f"model.revision={OLD}").resolved().model.revision == OLD
    llama = tiny_config(f"model.name={LLAMA}", "data.dataset=rotten-tomatoes-gen").resolved()
    assert (llama.model.revision, llama.model.causal, llama.data.task, llama.adapter.targets) == (
        MAIN, True, "generation", ("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="is a causal language model, which needs a generation task"):
        tiny_config(f"model.name={LLAMA}").resolved()
    # model.causal overrides what the config says
    with pytest.raises(ConfigError, match=f"model.name = '{BERT}' is an encoder"):
        tiny_config(f"model.name={BERT}", "data.dataset=rotten-tomatoes-gen").resolved()
    assert tiny_config(f"model.name={BERT}", "data.dataset=rotten-tomatoes-gen",
                       "model.causal=true").resolved().model.causal is True


def test_refusals_name_the_id_and_what_to_do(hf_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--set", "model.name=fedlora-test/absent", "--set", "train.rounds=1", "--out",
                 str(hf_home / "never"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (hf_home / "never").exists()
    assert ("model.name = 'fedlora-test/absent' (revision 'main') is not in the Hugging Face cache "
            f"({hf_home / 'hub'}) and HF_HUB_OFFLINE=1 forbids downloading it; download it first "
            "(`hf download fedlora-test/absent`) or unset HF_HUB_OFFLINE (no local directory has that name either)"
            ) in err
    with pytest.raises(ConfigError, match=r"model type 'distilbert', for which PEFT knows no default modules to "
                                          r"adapt; set adapter.targets"):
        tiny_config(f"model.name={ODD}").resolved()
    with pytest.raises(ConfigError, match="neither a bundled model .* nor a Hugging Face Hub id of the form"):
        tiny_config("model.name=not/a/hub/id")
    with pytest.raises(ConfigError, match="model.revision = 'v2' applies to Hub ids only"):
        tiny_config("model.revision=v2")


class _FakeHub(BaseHTTPRequestHandler):
    """Answers every request as the Hub answers a private (or gated) repository asked without a token."""

    error_code = "RepoNotFound"

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(401 if self.error_code == "RepoNotFound" else 403)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "access denied")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("error_code,message", [
    ("RepoNotFound", "does not exist on the Hugging Face Hub or is private; for a private model log in "
                     r"\(`hf auth login`\) or set HF_TOKEN"),
    ("GatedRepo", r"is a gated model: accept its terms on its Hub page, then log in \(`hf auth login`\)"),
])
def test_a_private_or_gated_model_without_a_token(hf_home: Path, monkeypatch: pytest.MonkeyPatch, error_code: str,
                                                  message: str) -> None:
    handler = type("Handler", (_FakeHub,), {"error_code": error_code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            f"http://127.0.0.1:{server.server_port}" + "/{repo_id}/resolve/{revision}/{filename}")
        hub._hub_config.cache_clear()
        with pytest.raises(ModelError, match=r"model.name = 'someone/private-model' \(revision 'main'\) " + message):
            tiny_config("model.name=someone/private-model").resolved()
    finally:
        server.shutdown()
        server.server_close()
        hub._hub_config.cache_clear()


@pytest.fixture(scope="module")
def hub_run(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's resumable run (fedit, 4 rounds), on the Hub id of tiny-bert."""
    out = tmp_path_factory.mktemp("hub") / "run"
    simulation.run(config.load(None, [*RESUMABLE, f"model.name={BERT}"]), RunDir(out), progress=False)
    return out


def test_saved_adapters_name_the_hub_id_and_commit_and_plain_peft_reloads_them(hub_run: Path) -> None:
    from peft import AutoPeftModelForSequenceClassification

    for folder in (hub_run / "global", hub_run / "clients" / "1"):
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert (saved["base_model_name_or_path"], saved["revision"]) == (BERT, MAIN)
    recorded = config.load(hub_run / "config.toml")
    assert (recorded.model.name, recorded.model.revision, recorded.model.causal) == (BERT, MAIN, False)
    # plain PEFT, from the adapter folder alone: it loads the base model by id at the recorded commit
    plain = AutoPeftModelForSequenceClassification.from_pretrained(str(hub_run / "global")).eval()
    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])}
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, export.load_saved(hub_run)(**batch).logits, rtol=0,
                                   atol=0)


def test_resume_evaluate_and_export_by_id(hub_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config.load(None, [*RESUMABLE, f"model.name={BERT}"])
    assert_same_run(hub_run, interrupted_and_resumed(cfg, tmp_path / "resumed", monkeypatch, "metrics:2"))
    assert main(["evaluate", str(hub_run), "--global"]) == 0
    assert json.loads(capsys.readouterr().out)["reproduced"]
    assert main(["export", str(hub_run), "--global", "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(hub_run), "--global", "--model", str(tmp_path / "exported")]) == 0
    assert json.loads(capsys.readouterr().out)["reproduced"]


def test_a_causal_lm_by_id_builds_with_its_tokenizer(hf_home: Path) -> None:
    from fedlora.experiment import build

    exp = build(tiny_config(f"model.name={LLAMA}", "data.dataset=rotten-tomatoes-gen", "data.max_examples=60",
                              "train.max_length=96"))
    assert type(exp.model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert exp.model.get_base_model().name_or_path == LLAMA
    assert models.load_tokenizer(exp.config.model).name_or_path == LLAMA


def test_roberta_by_id_on_sentence_pairs_keeps_its_two_layer_head_private(hf_home: Path, tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    rows = {"premise": [f"a man plays guitar {i}" for i in range(60)],
            "hypothesis": [("a man plays music", "a man is famous", "nobody plays")[i % 3] for i in range(60)],
            "label": [i % 3 for i in range(60)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "mnli.parquet"))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
        summary = simulation.run(tiny_config(f"model.name={ROBERTA}", "data.dataset=hf",
                                             f"data.path={tmp_path / 'mnli.parquet'}", "data.text_column=premise",
                                             "data.text_pair_column=hypothesis", "train.rounds=1"),
                                 RunDir(tmp_path / "run"), progress=False)
    assert summary["acc_global"] is None and 0.0 <= summary["acc_personal_mean"] <= 1.0  # FedSA: personal only
    saved = json.loads((tmp_path / "run" / "clients" / "0" / "adapter_config.json").read_text())
    assert (saved["base_model_name_or_path"], sorted(saved["target_modules"])) == (ROBERTA, ["query", "value"])
    from safetensors.torch import load_file

    head = sorted(k for k in load_file(str(tmp_path / "run" / "clients" / "0" / "adapter_model.safetensors"))
                  if "classifier" in k)
    assert head == [f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("bias", "weight")]
