"""The run directory (config.toml, metrics.jsonl, summary.json, clients/, global/) and the end-of-run table."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from fedlora.config import dumps
from fedlora.errors import FedloraError

if TYPE_CHECKING:
    from fedlora.experiment import Experiment


def atomic_write(path: Path, data: bytes | str, before_rename: Callable[[], None] | None = None) -> None:
    """Write via a temporary file, fsync and rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _without_samples(record: Mapping[str, Any]) -> dict[str, Any]:
    """A round's record as metrics.jsonl holds it: sample generations are kept in samples/ instead."""
    return {k: v for k, v in record.items() if k != "samples"}


class RunDir:
    """A run's output folder. An existing non-empty folder is refused unless ``overwrite`` (or ``resume``)."""

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume = resume
        if self.path.exists() and not self.path.is_dir():
            raise FedloraError(f"--out {str(self.path)!r} exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not (overwrite or resume):
            raise FedloraError(f"--out {str(self.path)!r} already holds files; pass --overwrite to replace them "
                               "or --resume to continue that run")

    def start(self, exp: Experiment) -> None:
        """Create the folder (clearing it with ``overwrite``) and write the resolved config."""
        if self.overwrite and self.path.is_dir():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / "config.toml", dumps(exp.config))
        if not self.resume:
            (self.path / "metrics.jsonl").write_text("", encoding="utf-8")

    def rewrite_metrics(self, records: list[Mapping[str, Any]]) -> None:
        """Replace metrics.jsonl with ``records`` (on resume: drop rounds after the last checkpoint)."""
        atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(_without_samples(r)) + "\n" for r in records))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Add a round's record to metrics.jsonl; its sample generations (generation tasks) go to
        ``samples/round_<t>.jsonl`` instead, one JSON object per line."""
        samples = record.get("samples")
        if samples is not None:
            record = _without_samples(record)
            (self.path / "samples").mkdir(exist_ok=True)
            atomic_write(self.path / "samples" / f"round_{record['round']}.jsonl",
                         "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_adapters(self, exp: Experiment, clients: Mapping[int, tuple[Mapping[str, torch.Tensor], str]],
                      global_state: Mapping[str, torch.Tensor] | None) -> None:
        """Each client's final adapter (``{client: (state, PEFT adapter name)}``) and the global one in PEFT
        format (loadable with ``PeftModel.from_pretrained``)."""
        for cid, (state, adapter) in clients.items():
            save_adapter(exp, state, self.path / "clients" / str(cid), adapter)
        if global_state is not None:
            save_adapter(exp, global_state, self.path / "global")

    def finish(self, exp: Experiment, summary: Mapping[str, Any]) -> None:
        full = {"method": exp.config.method.name, "adapter": exp.config.adapter.kind,
                "model": exp.config.model.name, "dataset": exp.config.data.dataset,
                "num_clients": len(exp.clients), **summary}
        atomic_write(self.path / "summary.json", json.dumps(full, indent=2) + "\n")


def save_adapter(exp: Experiment, state: Mapping[str, torch.Tensor], path: Path, adapter: str = "default") -> None:
    """Write ``state`` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) of the model's
    adapter ``adapter`` (a client's rank, with per-client ranks): always a plain top-level adapter folder."""
    from fedlora.export import write_base_weights

    exp.trainer.load(state, adapter)
    path.mkdir(parents=True, exist_ok=True)
    write_base_weights(exp, path)  # FedEx / FLoRA: the base weights the method changed (fedlora.export)
    if adapter == "default":
        exp.model.save_pretrained(str(path), selected_adapters=["default"])
        return
    # PEFT writes an adapter other than "default" into a subfolder named after it; move its files up.
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        exp.model.save_pretrained(tmp, selected_adapters=[adapter])
        for f in (Path(tmp) / adapter).iterdir():
            os.replace(f, path / f.name)


def _fmt_acc(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def summary_table(rows: list[Mapping[str, Any]]) -> Any:
    """A rich Table of final global / personalized accuracy and bytes, one row per run summary."""
    from rich import box
    from rich.table import Table

    # Short headers and a light box: the table must fit an 80-column terminal without wrapping.
    table = Table(title="accuracy: global model · personalized (mean, weighted) | bytes sent", box=box.SIMPLE_HEAD)
    for col in ("method", "global", "personal", "weighted", "up", "down", "time"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for s in rows:
        table.add_row(f"{s['method']}/{s['adapter']}", _fmt_acc(s.get("acc_global")),
                      _fmt_acc(s.get("acc_personal_mean")), _fmt_acc(s.get("acc_personal_weighted")),
                      _fmt_bytes(s["bytes_up_total"]), _fmt_bytes(s["bytes_down_total"]), f"{s['wall_seconds']:.0f} s")
    return table
