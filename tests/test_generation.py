"""Generation tasks on a causal LM: prompt encoding, response-only loss, generation-based evaluation, every
method × adapter on tiny-llama, the model cache, and the config resolution that picks task and targets."""

from __future__ import annotations

import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_config
from fedlora import config as cfgmod
from fedlora import models
from fedlora.adapters import role
from fedlora.config import DataConfig
from fedlora.data.instructions import (HASH_BUCKETS, InstructionDataset, load_instruction_dataset, normalize_answer,
                                       partition_labels)
from fedlora.data.prompts import EncodedInstructions, encode_instructions
from fedlora.errors import ConfigError, DataError
from fedlora.methods import METHODS
from fedlora.report import RunDir
from fedlora.runtime import simulation
from fedlora.tasks_gen import IGNORE, GenerationTask, token_f1

ADAPTERS = ("lora", "rslora", "vera")
GEN = ("model.name=tiny-llama", "data.dataset=rotten-tomatoes-gen", "data.max_examples=60", "train.max_length=64",
       "train.local_steps=1", "train.batch_size=4", "train.eval_batch_size=16")


def byte_tokenizer(chat_template: str | None = None) -> Any:
    tok = models.byte_tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_lm(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------- prompt encoding

def dataset(instructions: tuple[str, ...], inputs: tuple[str, ...], responses: tuple[str, ...]) -> InstructionDataset:
    labels, names = partition_labels(responses)
    return InstructionDataset("t", instructions, inputs, responses, labels, names)


def test_alpaca_prompt_truncates_the_input_and_keeps_instruction_template_and_response() -> None:
    tok = byte_tokenizer()  # no chat template: the Alpaca layout
    ds = dataset(("Name the topic.", "Say hi."), ("x" * 500, ""), ("sports", "hi"))

    enc = encode_instructions(ds, tok, max_length=80)

    first = tok.decode(enc.prompt_ids[0])
    assert first.startswith("### Instruction:\nName the topic.\n\n### Input:\nxxx")
    assert first.endswith("xxx\n\n### Response:\n")
    assert len(enc.prompt_ids[0]) + len(enc.response_ids[0]) == 80  # the input was cut to fit exactly
    assert enc.response_ids[0].tolist() == tok("sports")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(enc.prompt_ids[1]) == "### Instruction:\nSay hi.\n\n### Response:\n"  # no input
    assert enc.references == ("sports", "hi")


def test_chat_template_wraps_instruction_and_input_in_one_user_turn() -> None:
    tok = byte_tokenizer("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    enc = encode_instructions(dataset(("Topic?",), ("An article.",), ("tech",)), tok, max_length=64)
    assert tok.decode(enc.prompt_ids[0]) == "<u>Topic?\n\nAn article.</u><a>"


def test_max_length_too_short_for_the_template_is_an_error() -> None:
    with pytest.raises(DataError, match="train.max_length = 20 leaves no room"):
        encode_instructions(dataset(("Topic?",), ("An article.",), ("tech",)), byte_tokenizer(), max_length=20)


# ------------------------------------------------------------------------------------ the loss covers the response

def test_loss_masks_prompt_and_padding_and_equals_full_logit_cross_entropy() -> None:
    # Prepare: two examples of different lengths, so the shorter one is left-padded.
    enc = EncodedInstructions(prompt_ids=(torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])),
                              response_ids=(torch.tensor([11, 12, 1]), torch.tensor([13, 1])),
                              references=("a", "b"))
    tok = byte_tokenizer()
    task = GenerationTask(enc, tok)
    model = tiny_lm(vocab=len(tok))

    # Execute
    batch = task.batch([0, 1], torch.device("cpu"))
    loss = task.loss(model, batch)

    # Assert: labels are the response ids at the end of each row and IGNORE everywhere else.
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 11, 12, 1], [pad, pad, pad, 9, 10, 13, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [0, 0, 0, 1, 1, 1, 1]]
    assert batch["position_ids"][1].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert batch["labels"].tolist() == [[IGNORE] * 4 + [11, 12, 1], [IGNORE] * 5 + [13, 1]]
    # Independently: full logits, shifted by one, cross-entropy over the 5 response tokens only.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    picks = [(0, 3, 11), (0, 4, 12), (0, 5, 1), (1, 4, 13), (1, 5, 1)]  # (row, predicting column, target)
    want = -torch.stack([torch.log_softmax(logits[r, c], -1)[t] for r, c, t in picks]).mean()
    torch.testing.assert_close(loss.detach(), want)
    torch.testing.assert_close(model(**batch).loss.detach(), want)  # transformers' own shifted loss agrees
    full = GenerationTask(enc, tok, logits_to_keep=False).loss(model, batch)
    torch.testing.assert_close(full.detach(), want)
    # Left padding with explicit positions changes nothing: the padded row scores like the row alone.
    alone = task.batch([1], torch.device("cpu"))
    with torch.no_grad():
        alone_logits = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"],
                             position_ids=alone["position_ids"]).logits
    torch.testing.assert_close(logits[1, 3:], alone_logits[0], rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- evaluation by generation

class ScriptedLM(torch.nn.Module):
    """Uniform next-token distribution (so the response perplexity is the vocabulary size) and generations
    looked up from the last prompt token."""

    def __init__(self, vocab: int, script: dict[int, list[int]]) -> None:
        super().__init__()
        self.vocab = vocab
        self.script = script

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int | torch.Tensor = 0, **_: Any) -> Any:
        # transformers' contract: an int keeps the last positions, a 1-D tensor names the positions kept
        width = len(logits_to_keep) if isinstance(logits_to_keep, torch.Tensor) else logits_to_keep or input_ids.shape[1]
        return type("Out", (), {"logits": torch.zeros(input_ids.shape[0], width, self.vocab)})()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: Any) -> torch.Tensor:
        n = generation_config.max_new_tokens
        rows = [(self.script[int(row[-1])] + [generation_config.pad_token_id] * n)[:n] for row in input_ids]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_generation_evaluation_scores_exact_match_f1_ppl_and_keeps_samples() -> None:
    tok = byte_tokenizer()
    ids = lambda s: tok(s)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    refs = ("sports", "tech", "positive", "the big dog")
    enc = EncodedInstructions(prompt_ids=tuple(torch.tensor([40, 41, 50 + i]) for i in range(4)),
                              response_ids=tuple(torch.tensor(ids(r) + [eos]) for r in refs), references=refs)
    script = {50: ids(" Sports.") + [eos], 51: ids("business") + [eos],
              52: ids("positive") + [eos] + ids("junk after the end"), 53: ids("a big dog") + [eos]}
    task = GenerationTask(enc, tok, samples=2)

    out = task.evaluate(ScriptedLM(len(tok), script), np.array([0, 1, 2, 3]), batch_size=3, device=torch.device("cpu"))

    assert out["acc"] == 0.5  # " Sports." and "positive" (text after the end token is dropped)
    assert out["f1"] == pytest.approx((1 + 0 + 1 + 2 * (2 / 3) * (2 / 3) / (4 / 3)) / 4)
    assert out["ppl"] == pytest.approx(len(tok)) and out["loss"] == pytest.approx(math.log(len(tok)))
    assert out["n"] == 4
    assert [(s["example"], s["reference"], s["generation"], s["exact_match"]) for s in out["samples"]] == \
        [(0, "sports", " Sports.", True), (3, "the big dog", "a big dog", False)]  # the first and the last


def test_answer_normalisation_and_token_f1() -> None:
    assert normalize_answer("  The  Sports!\n") == "the sports"
    assert normalize_answer("don't") == normalize_answer("Don't.")
    assert token_f1("sports", "Sports.") == 1.0 and token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


# --------------------------------------------------------------------------------- every method × adapter, 2 rounds

def _combos() -> list[tuple[str, str]]:
    return list(itertools.product(sorted(METHODS), ADAPTERS))


@pytest.mark.parametrize("method,adapter", _combos())
def test_every_method_and_adapter_trains_tiny_llama(tmp_path: Path, method: str, adapter: str) -> None:
    try:  # what fits is the registry's rule (fedlora.registry.check_compatible), tested in test_extending.py
        cfg = tiny_config(*GEN, f"method.name={method}", f"adapter.kind={adapter}")
    except ConfigError as e:
        pytest.skip(f"{method} refuses {adapter}: {e}")

    summary = simulation.run(cfg, RunDir(tmp_path / "run"), progress=False)

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:
        assert "samples" not in r
        assert math.isfinite(r["ppl_personal_mean"]) and 0 <= r["acc_personal_mean"] <= 1
        assert (r["ppl_global"] is None) == (r["acc_global"] is None)
        lines = (run / "samples" / f"round_{r['round']}.jsonl").read_text().splitlines()
        assert lines and {"model", "prompt", "reference", "generation", "exact_match"} <= set(json.loads(lines[0]))
    assert math.isfinite(summary["train_loss"]) and "ppl_personal_mean" in summary
    saved = tomllib.loads((run / "config.toml").read_text())
    assert (saved["data"]["task"], saved["adapter"]["targets"]) == ("generation", ["q_proj", "v_proj"])


def test_adapters_on_tiny_llama_cover_q_and_v_with_their_own_shapes() -> None:
    from fedlora.experiment import build

    for adapter, a_key, b_key in (("lora", "lora_A.weight", "lora_B.weight"), ("vera", "vera_lambda_d", "vera_lambda_b")):
        exp = build(tiny_config(*GEN, f"adapter.kind={adapter}"))
        assert {role(k) for k in exp.init_state} == {"A", "B"}  # no classification head on a causal LM
        shapes = {k.split(".self_attn.")[1]: tuple(v.shape) for k, v in exp.init_state.items() if ".layers.0." in k}
        # q_proj is 32 -> 32 and v_proj 32 -> 16 (grouped-query attention, like SmolLM2's 576 -> 576 and 576 -> 192)
        if adapter == "lora":
            assert shapes == {f"q_proj.{a_key}": (4, 32), f"q_proj.{b_key}": (32, 4),
                              f"v_proj.{a_key}": (4, 32), f"v_proj.{b_key}": (16, 4)}
        else:
            assert shapes == {f"q_proj.{a_key}": (4,), f"q_proj.{b_key}": (32,),
                              f"v_proj.{a_key}": (4,), f"v_proj.{b_key}": (16,)}


def test_tiny_llama_without_smollm2_uses_a_byte_tokenizer_and_the_alpaca_layout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "fedlora_no_such_package")
    models.load_tokenizer.cache_clear()
    try:
        from fedlora.experiment import build

        exp = build(tiny_config(*GEN, "train.max_length=192", "train.rounds=1"))
        assert len(models.load_tokenizer(exp.config.model)) == 257  # 256 bytes + end of text
        prompt = exp.task.tokenizer.decode(exp.task.encoded.prompt_ids[0])
        assert prompt.startswith("### Instruction:\nIs this movie review") and prompt.endswith("### Response:\n")
        assert math.isfinite(simulation.run(exp.config, None, progress=False, exp=exp)["train_loss"])
    finally:
        models.load_tokenizer.cache_clear()


def test_classification_records_have_no_generation_fields(tmp_path: Path) -> None:
    simulation.run(tiny_config("train.rounds=1", "train.local_steps=1"), RunDir(tmp_path / "run"), progress=False)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        assert not {"ppl_global", "ppl_personal_mean", "samples"} & set(json.loads(line))
    assert not (tmp_path / "run" / "samples").exists()


# --------------------------------------------------------------------------------------- config: task and targets

@pytest.mark.parametrize("overrides,task,targets", [
    (("model.name=tiny-llama", "data.dataset=bbc-news-gen"), "generation", ("q_proj", "v_proj")),
    (("model.name=tiny-bert",), "classification", ("query", "value")),
    (("model.name=tiny-llama", "data.dataset=jsonl", "data.path=x.jsonl"), "generation", ("q_proj", "v_proj")),
    (("model.name=tiny-llama", "data.dataset=rotten-tomatoes-gen", "adapter.targets=[\"o_proj\"]"), "generation",
     ("o_proj",)),
])
def test_resolved_config_names_the_task_and_the_targets(overrides: tuple[str, ...], task: str,
                                                        targets: tuple[str, ...]) -> None:
    resolved = cfgmod.load(None, list(overrides)).resolved()
    assert (resolved.data.task, resolved.adapter.targets) == (task, targets)


@pytest.mark.parametrize("overrides,match", [
    (("model.name=smollm2",), "causal language model, which needs a generation task; use data.dataset = "
                              "'rotten-tomatoes-gen'"),
    (("model.name=tiny-bert", "data.dataset=bbc-news-gen"), "needs a causal language model"),
    (("data.dataset=bbc-news-gen", "data.task=classification"), "use data.dataset = 'bbc-news' for classification"),
    (("data.dataset=bbc-news", "data.task=generation"), "use data.dataset = 'bbc-news-gen'"),
    (("data.prompt_column=q",), "set both or neither"),
])
def test_config_errors_for_generation(overrides: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cfgmod.load(None, list(overrides)).resolved()


# ---------------------------------------------------------------------------------------------- instruction files

def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_instruction_file_layouts(tmp_path: Path) -> None:
    alpaca = write(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1+1", "output": "2"},
                                          {"instruction": "Greet.", "output": "Hello!"}])
    ds = load_instruction_dataset(DataConfig(dataset="jsonl", path=str(alpaca)))
    assert (ds.instructions, ds.inputs, ds.responses) == (("Add.", "Greet."), ("1+1", ""), ("2", "Hello!"))
    assert ds.label_names == ("2", "hello") and ds.labels.tolist() == [0, 1]

    pr = write(tmp_path / "p.jsonl", [{"prompt": "Q?", "response": "A."}])
    assert load_instruction_dataset(DataConfig(dataset="jsonl", path=str(pr))).instructions == ("Q?",)

    csv_file = tmp_path / "c.csv"
    csv_file.write_text("question,answer,other\nWhy?,Because.,x\n", encoding="utf-8")
    ds = load_instruction_dataset(DataConfig(dataset="csv", path=str(csv_file), prompt_column="question",
                                             response_column="answer"))
    assert (ds.instructions, ds.responses) == (("Why?",), ("Because.",))


@pytest.mark.parametrize("rows,match", [
    ([{"text": "a", "label": "b"}], "is not instruction data: expected the columns instruction"),
    ([{"instruction": "a", "output": ""}], "line 1: empty or missing 'output'"),
])
def test_instruction_file_errors(tmp_path: Path, rows: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_instruction_dataset(DataConfig(dataset="jsonl", path=str(write(tmp_path / "x.jsonl", rows))))


def test_partition_labels_are_responses_or_stable_hash_buckets() -> None:
    labels, names = partition_labels(("Yes.", "no", "yes"))
    assert names == ("no", "yes") and labels.tolist() == [1, 0, 1]
    free = tuple(f"answer number {i}" for i in range(100))
    labels, names = partition_labels(free)
    assert len(names) == HASH_BUCKETS and labels.max() < HASH_BUCKETS
    assert partition_labels(free)[0].tolist() == labels.tolist()  # no per-process salt


def test_bundled_generation_tasks() -> None:
    bbc = load_instruction_dataset(DataConfig(dataset="bbc-news-gen"))
    assert len(bbc) == 2225 and set(bbc.responses) == {"business", "entertainment", "politics", "sports", "tech"}
    assert all(bbc.label_names[lab] == resp for lab, resp in zip(bbc.labels, bbc.responses))
    rt = load_instruction_dataset(DataConfig(dataset="rotten-tomatoes-gen", max_examples=100))
    assert len(rt) == 100 and set(rt.responses) == {"positive", "negative"}


# ---------------------------------------------------------------------------------------------- the model cache

def test_converted_model_is_cached_atomically_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def fake_convert(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_smollm2", fake_convert)
    first = models.smollm2_dir()
    second = models.smollm2_dir()

    assert first == second == tmp_path / "cache" / models.smollm2_cache_name()
    assert len(calls) == 1 and calls[0] != first  # built in a temporary folder, then renamed into place
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))

    def broken(out: Path) -> None:
        (out / "model.safetensors").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(models, "convert_smollm2", broken)
    with pytest.raises(OSError, match="disk full"):
        models.smollm2_dir()
    assert list(tmp_path.iterdir()) == []


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEDLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / "fedlora"
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "mine"))
    assert models.cache_root() == tmp_path / "mine"


@pytest.mark.slow
def test_real_smollm2_loads_from_the_cache_and_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfgmod.ModelConfig(name="smollm2")
    model = models.load_causal_lm(cfg, seed=0)  # converts the GGUF file if the cache is empty
    monkeypatch.setattr(models, "convert_smollm2", lambda out: pytest.fail("converted twice"))
    again = models.load_causal_lm(cfg, seed=0)  # from the cached float32 directory
    layer = again.model.layers[0].self_attn
    assert tuple(layer.q_proj.weight.shape) == (576, 576) and tuple(layer.v_proj.weight.shape) == (192, 576)
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(model.model.layers[3].self_attn.v_proj.weight, again.model.layers[3].self_attn.v_proj.weight)
    tok = models.load_tokenizer(cfg)
    ds = dataset(("Is this movie review positive or negative? Answer with one word.",),
                 ("A wonderful, moving film.",), ("positive",))
    task = GenerationTask(encode_instructions(ds, tok, max_length=96), tok)
    text = task.generate(again, np.array([0]), batch_size=1, device=torch.device("cpu"))[0]
    assert text.strip()  # a real instruction-tuned model answers something
