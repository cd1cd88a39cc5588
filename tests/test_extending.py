"""The extension points: the worked example of docs/extending.md runs from its own file, plugin errors are one
line, the one compatibility rule refuses every unfit combination at config time, and names live in their plugin."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import TINY, tiny_config
from fedlora import registry
from fedlora.cli import main
from fedlora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY_SET = [arg for kv in TINY for arg in ("--set", kv)]


def first_python_block(doc: Path) -> str:
    match = re.search(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert match, f"no python block in {doc}"
    return match.group(1)


@pytest.fixture
def example(tmp_path):
    """The documented plugin, written to its own file; unregistered afterwards (registries are per process)."""
    path = tmp_path / "trimmed_mean.py"
    path.write_text(first_python_block(ROOT / "docs" / "extending.md"), encoding="utf-8")
    yield path
    registry.METHODS.unregister("trimmed-mean")
    for name in [m for m in sys.modules if m.startswith("fedlora_plugin_")]:
        del sys.modules[name]


def test_the_documented_plugin_is_listed_and_runs(example, tmp_path, capsys) -> None:
    assert main(["methods", "--plugin", str(example)]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^  trimmed-mean +FedIT with a coordinate-wise trimmed mean", listing, re.M)
    assert "adapters: dora, lora, rslora, vera" in listing.split("trimmed-mean", 1)[1].splitlines()[0]
    assert main(["config", "--plugin", str(example), "--keys"]) == 0
    assert re.search(r"^method\.trim +0\.2 .*\[trimmed-mean\]", capsys.readouterr().out, re.M)

    out = tmp_path / "run"
    assert main(["run", "--plugin", str(example), *TINY_SET, "--set", "method.name=trimmed-mean",
                 "--set", "method.trim=0.34", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "trimmed-mean" and summary["acc_global"] is not None
    assert "trim = 0.34" in (out / "config.toml").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2] and all(r["participants"] == [0, 1, 2] for r in records[1:])


def test_the_plugin_median_differs_from_the_mean(example) -> None:
    """trim = 0.34 of 3 clients keeps the middle value of each coordinate: the median, not FedIT's mean."""
    import torch

    from fedlora.methods import Upload

    registry.load_plugin(example)
    cls = registry.METHODS["trimmed-mean"]
    from fedlora.experiment import build

    exp = build(tiny_config("method.name=fedit", "method.weighting=uniform"))
    method = cls(tiny_config("method.name=trimmed-mean", "method.trim=0.34"), exp.info)
    key = exp.method.shared_keys()[0]
    base = exp.init_state[key]
    ups = [Upload(c, {key: base + v}, 10) for c, v in enumerate((0.0, 1.0, 10.0))]
    got = method.aggregate(ups, exp.init_state).payload[key]
    assert torch.allclose(got, base + 1.0)  # the median; the mean would be base + 11/3


BAD_PLUGINS = [
    ("raise RuntimeError('boom')\n", "failed to import: RuntimeError: boom"),
    ("from fedlora.methods import Method\nfrom fedlora.registry import METHODS\n"
     "class X(Method):\n    name = 'fedit'\n    description = 'x'\n    def aggregate(self, u, g): ...\n"
     "METHODS.register(X)\n", "method name 'fedit' is already registered"),
    ("from fedlora.registry import ADAPTERS\nclass K:\n    name = 'k'\n    description = 'k'\n"
     "    provides = frozenset({'telepathy'})\nADAPTERS.register(K())\n", "provides names unknown capabilities"),
]


@pytest.mark.parametrize("text,message", BAD_PLUGINS, ids=["import-error", "clash", "unknown-capability"])
def test_a_broken_plugin_is_one_line_and_exit_2(tmp_path, capsys, text, message) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(text)
    assert main(["methods", "--plugin", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert main(["methods", "--plugin", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_every_unfit_combination_is_refused_at_config_time_with_the_reason() -> None:
    refused = []
    for method, cls in registry.METHODS.items():
        for kind, plugin in registry.ADAPTERS.items():
            missing = registry.unmet([("method.name", cls), ("adapter.kind", plugin)])
            if not missing:
                tiny_config(f"method.name={method}", f"adapter.kind={kind}")  # accepted
                continue
            # the method needs what the adapter kind lacks, or (LoRA-SB) the adapter kind needs what the method lacks
            with pytest.raises(ConfigError, match=rf"(method.name = '{method}'|adapter.kind = '{kind}') needs .* which "
                                                  "this configuration does not provide; it is provided by: "
                                                  "(adapter.kind|method.name) = "):
                tiny_config(f"method.name={method}", f"adapter.kind={kind}")
            refused.append((method, kind))
    assert ("fedex", "vera") in refused and ("flora-na", "dora") in refused and ("fedsa", "dora") not in refused
    with pytest.raises(ConfigError, match=r"adapter.rank = \[2, 3, 4\] needs clients with adapters of different ranks"
                                          r".*method.name = 'flora'"):
        tiny_config("adapter.rank=[2,3,4]")


def test_each_name_is_a_string_literal_in_its_plugin_and_at_most_one_other_file() -> None:
    files = sorted((ROOT / "src" / "fedlora").rglob("*.py"))
    # __all__ lists function names (functional.fedit), not plugin names
    texts = {f: re.sub(r"__all__ = \[.*?\]", "", f.read_text(encoding="utf-8"), flags=re.S) for f in files}
    for reg in (registry.METHODS, registry.ADAPTERS, registry.DATASETS):
        for name in reg.names():
            holders = [f.relative_to(ROOT) for f, t in texts.items()
                       if re.search(rf"""(?<![\w-])["']{re.escape(name)}["']""", t)]
            assert 1 <= len(holders) <= 2, (reg.kind, name, holders)
