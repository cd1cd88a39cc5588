"""Tests of the performance features: a light CLI, the compute dtype, bf16 storage, evaluation.

They check behaviour only (what is imported, which dtype is chosen and stored, that results are exact or
deterministic); timings belong in ``benchmarks/throughput.py`` and ``benchmarks/aggregation.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "numpy", "sklearn", "flwr")


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
