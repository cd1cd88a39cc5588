"""model.quantization: a bitsandbytes-quantized frozen base (QLoRA) on tiny-llama, on the CPU backend of bitsandbytes
0.50; the refusals (bad value, encoder, methods that change base weights, bitsandbytes missing, a device it does
not support) are tested whether or not bitsandbytes is installed where they can be."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from fedlora import config, experiment, models, quantize
from fedlora.cli import main
from fedlora.errors import ConfigError, ModelError

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install --no-deps "
                               "bitsandbytes==0.50.2, or the 'quantization' extra)")
GEN = ("model.name=tiny-llama", "data.dataset=math-word", "data.max_examples=60", "train.max_length=128",
       "train.rounds=1", "method.name=fedsa", "data.num_clients=2", "train.max_new_tokens=4", "train.eval_clients=1")


@pytest.mark.parametrize("value", ["fp8", "4bit", "NF4"])
def test_bad_value_is_refused_naming_the_key_and_the_choices(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"model.quantization = '{value}' is not allowed; choose one of: none, nf4, int8"):
        tiny_config(*GEN, f"model.quantization={value}")


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_methods_that_change_the_base_are_refused_with_a_quantized_base(method: str) -> None:
    with pytest.raises(ConfigError, match=rf"method.name = '{method}' changes the frozen base weights.*"
                                          r"model.quantization = 'nf4'"):
        tiny_config(*GEN, f"method.name={method}", "model.quantization=nf4")
    assert tiny_config(*GEN, f"method.name={method}").model.quantization == "none"  # unquantized: allowed


def test_cli_refuses_with_exit_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code = main(["run", "--set", "model.name=tiny-llama", "--set", "data.dataset=math-word", "--set",
                 "method.name=fedex", "--set", "model.quantization=int8", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "changes the frozen base weights" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_encoder_is_refused() -> None:
    with pytest.raises(ModelError, match=r"model.quantization = 'nf4' applies to causal language models.*tiny-bert"):
        experiment.build(tiny_config("model.quantization=nf4"))


def test_missing_bitsandbytes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(quantize.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelError, match=r"model.quantization = 'nf4' needs the package bitsandbytes.*"
                                         r"pip install --no-deps bitsandbytes==0.50.2"):
        experiment.build(tiny_config(*GEN, "model.quantization=nf4"))


@needs_bnb
def test_unsupported_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(ModelError, match=r"model.quantization = 'int8': bitsandbytes .* has no backend for "
                                         r"train.device 'cpu' \(it supports: cuda\)"):
        quantize.bnb_config("int8", torch.device("cpu"), torch.float32)


@needs_bnb
@pytest.mark.parametrize("value, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_base_layers_are_quantized_and_adapters_float32(value: str, layer: str) -> None:
    exp = experiment.build(tiny_config(*GEN, f"model.quantization={value}"))
    names = quantize.quantized_layers(exp.model)
    # tiny-llama: 2 layers x (q, k, v, o, gate, up, down); the tied LM head stays unquantized.
    assert len(names) == 14
    q_proj = exp.model.get_submodule(next(n for n in names if n.endswith("layers.0.self_attn.q_proj.base_layer")))
    assert type(q_proj).__name__ == layer
    assert exp.slots and all(p.dtype == torch.float32 for p in exp.slots.values())


@needs_bnb
@pytest.mark.parametrize("value", ["nf4", "int8"])
def test_fedsa_round_trains_and_saves_a_plain_peft_adapter(value: str, tmp_path) -> None:
    from peft import PeftModel

    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    cfg = tiny_config(*GEN, f"model.quantization={value}")
    init = experiment.build(cfg).init_state
    simulation.run(cfg, RunDir(tmp_path / "run"), progress=False)
    folder = tmp_path / "run" / "clients" / "0"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved.keys() == init.keys()
    b_keys = [k for k in saved if ".lora_B." in k]
    assert b_keys and all(torch.count_nonzero(init[k]) == 0 for k in b_keys)  # LoRA's B starts at zero ...
    assert all(torch.isfinite(saved[k]).all() and torch.count_nonzero(saved[k]) > 0 for k in b_keys)  # ... trained
    adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
    assert "quantiz" not in json.dumps(adapter_cfg)
    # Plain PEFT over the unquantized base: the same tiny-llama weights (seeded), float32 nn.Linear layers.
    base = models.load_causal_lm(config.load(None, [*GEN]).model, seed=cfg.adapter.seed)
    reloaded = PeftModel.from_pretrained(base, str(folder))
    assert not quantize.quantized_layers(reloaded)
    live = {k.replace(".default", ""): v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert live.keys() == saved.keys()
    assert all(torch.equal(live[k], saved[k]) for k in saved)
