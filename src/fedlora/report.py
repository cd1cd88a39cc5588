"""The run directory (config.toml, metrics.jsonl, summary.json, clients/, global/) and the end-of-run table."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from fedlora.config import dumps
from fedlora.errors import FedloraError
from fedlora.storage import (LOCK_FILE, MARKER_FILE, RUN_ENTRIES, DirLock, StorageError, append_line, atomic_write,
                             check_writable_dir, describe_os_error, foreign_entries, replace_dir)

__all__ = ["RunDir", "atomic_write", "save_adapter", "summary_table"]

if TYPE_CHECKING:
    from fedlora.experiment import Experiment


def _without_samples(record: Mapping[str, Any]) -> dict[str, Any]:
    """A round's record as metrics.jsonl holds it: sample generations are kept in samples/ instead."""
    return {k: v for k, v in record.items() if k != "samples"}


class RunDir:
    """A run's output folder, locked while this object works in it.

    What it promises (README, "Reliability"):

    * a folder that holds anything is refused unless ``overwrite`` or ``resume``;
    * ``overwrite`` removes only what fedlora wrote for an earlier run (:data:`fedlora.storage.RUN_ENTRIES`, in a
      folder marked as a run directory), and only in :meth:`start`, i.e. after the new run has built its model and
      data; a folder holding anything else is refused with the names of what is there;
    * one process at a time: a second writer is refused with the holder's PID (``flock``, released by the kernel
      when the holder ends, however it ends);
    * the output place is checked before any work: an ``--out`` under a file or in a place that cannot be written
      is refused at construction.
    """

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False, lock: bool = True) -> None:
        self.path = Path(path)
        self.on_event: Callable[[str, int], None] | None = None  # observers of its writes (set by the runtime)
        self.overwrite = overwrite
        self.resume = resume
        if self.path.exists() and not self.path.is_dir():
            raise FedloraError(f"--out {str(self.path)!r} exists and is not a directory")
        check_writable_dir(self.path, "--out")
        # The ServerApp of a Flower run writes into the folder its launcher has locked: it passes lock=False.
        self._lock = DirLock(self.path) if lock else None
        if self.path.is_dir():
            self._check_contents()
            if self._lock is not None:
                self._lock.acquire()  # refuse a second writer before any work
                self._check_contents()  # again, now that nobody else can change it

    def _check_contents(self) -> None:
        entries = [e.name for e in self.path.iterdir() if e.name != LOCK_FILE] if self.path.is_dir() else []
        if not entries or self.resume:
            return
        if not self.overwrite:
            raise FedloraError(f"--out {str(self.path)!r} already holds files; pass --overwrite to replace an earlier "
                               "fedlora run there, or --resume to continue it")
        foreign = foreign_entries(self.path)
        if foreign:
            shown = ", ".join(map(repr, foreign[:5])) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FedloraError(f"--overwrite {str(self.path)!r}: the folder holds files fedlora did not write "
                               f"({shown}); nothing was deleted. Move them away or choose another --out")
        if not (self.path / MARKER_FILE).is_file() and not (self.path / "config.toml").is_file():
            raise FedloraError(f"--overwrite {str(self.path)!r}: not a fedlora run directory (no {MARKER_FILE} or "
                               "config.toml); nothing was deleted. Choose another --out")

    def lock(self) -> None:
        """Take the folder's lock now (it must exist); :meth:`start` does it otherwise."""
        if self._lock is not None:
            self._lock.acquire()

    def close(self) -> None:
        """Release the lock (also released by the kernel when the process ends)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, exp: Experiment) -> None:
        """Lock and create the folder (removing an earlier run's files with ``overwrite``), write the resolved
        config. Called once the experiment is built, so a run that cannot start deletes nothing."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create --out {str(self.path)!r}: {describe_os_error(e)}") from None
        if self._lock is not None and not self._lock.held:
            self._lock.acquire()
        self._check_contents()  # another process may have written here since the constructor looked
        if self.overwrite and not self.resume:
            for entry in sorted(self.path.iterdir()):
                name = entry.name.removesuffix(".tmp").removesuffix(".old")
                if name == LOCK_FILE or name not in RUN_ENTRIES:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        atomic_write(self.path / MARKER_FILE, json.dumps({"fedlora_run": 1, "created": time.time()}) + "\n")
        # The resolved config, with why train.dtype is what it is (auto's choice) as a comment above it.
        note = f"# train.dtype = {exp.config.train.dtype!r}: {exp.dtype_reason}\n" if exp.dtype_reason else ""
        atomic_write(self.path / "config.toml", note + dumps(exp.config))
        if not self.resume:
            atomic_write(self.path / "metrics.jsonl", "")

    def record_resume(self, entry: Mapping[str, Any]) -> None:
        """Append what a resume continued from (and any allowed config change) to ``resumes.jsonl``."""
        append_line(self.path / "resumes.jsonl", json.dumps(entry) + "\n")

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
        append_line(self.path / "metrics.jsonl", json.dumps(record, sort_keys=False) + "\n")

    def save_adapters(self, exp: Experiment, clients: Mapping[int, tuple[Mapping[str, torch.Tensor], str]],
                      global_state: Mapping[str, torch.Tensor] | None) -> None:
        """Each client's final adapter (``{client: (state, PEFT adapter name)}``) and the global one in PEFT
        format (loadable with ``PeftModel.from_pretrained``)."""
        for cid, (state, adapter) in clients.items():
            save_adapter(exp, state, self.path / "clients" / str(cid), adapter, on_event=self.on_event)
        if global_state is not None:
            save_adapter(exp, global_state, self.path / "global")

    def finish(self, exp: Experiment, summary: Mapping[str, Any]) -> None:
        full = {"method": exp.config.method.name, "adapter": exp.config.adapter.kind,
                "model": exp.config.model.name, "dataset": exp.config.data.dataset,
                "num_clients": len(exp.clients), "dtype": exp.config.train.dtype,
                "dtype_reason": exp.dtype_reason, **summary}
        atomic_write(self.path / "summary.json", json.dumps(full, indent=2) + "\n")


def save_adapter(exp: Experiment, state: Mapping[str, torch.Tensor], path: Path, adapter: str = "default",
                 on_event: Callable[[str, int], None] | None = None) -> None:
    """Write ``state`` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) of the model's
    adapter ``adapter`` (a client's rank, with per-client ranks): always a plain top-level adapter folder.

    The folder is written whole beside its destination (``<path>.tmp``) and then renamed into place, so a crash or a
    full disk never leaves a half-written adapter; a failed write removes the temporary folder and raises
    :class:`~fedlora.storage.StorageError`."""
    exp.trainer.load(state, adapter)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an earlier process that was killed while writing
        tmp.mkdir(parents=True)
        if adapter == "default":
            exp.model.save_pretrained(str(tmp), selected_adapters=["default"])
        else:
            # PEFT writes an adapter other than "default" into a subfolder named after it; move its files up.
            with tempfile.TemporaryDirectory(dir=tmp) as inner:
                exp.model.save_pretrained(inner, selected_adapters=[adapter])
                for f in (Path(inner) / adapter).iterdir():
                    os.replace(f, tmp / f.name)
        from fedlora.export import write_base_weights
        from fedlora.private_adapter import write_private_adapter

        write_base_weights(exp, tmp)  # FedEx / FLoRA: the base weights the method changed (fedlora.export)
        write_private_adapter(exp, state, tmp)  # FedDPA: the client's local adapter, in tmp/private/
        if on_event is not None:
            on_event("adapter-write", 0)  # observers: the crash tests kill the process here
        replace_dir(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        run = path.parent.parent if path.parent.name == "clients" else path.parent
        raise StorageError(f"cannot write the adapter {str(path)!r}: {describe_os_error(e)}; the run's checkpoint is "
                           f"intact: free space and continue with fedlora run --resume {str(run)!r}") \
            from None


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
