"""Watching a run as it writes its directory: an overall progress bar (``fedlora compare``) and TensorBoard.

:class:`ObservedRunDir` is a :class:`~fedlora.report.RunDir` that also hands every round's record to observers,
so neither the runtime nor the round loop knows about progress bars or TensorBoard.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from fedlora.errors import FedloraError
from fedlora.protocol import RECORD_FIELDS
from fedlora.report import RunDir

if TYPE_CHECKING:
    from fedlora.experiment import Experiment

TENSORBOARD_INSTALL = "pip install 'fedlora[tensorboard]' (or: pip install tensorboard)"

# record key -> TensorBoard tag, as declared with the record's fields (fedlora.protocol.RECORD_FIELDS); bytes are
# logged cumulatively so that curves can be read against traffic.
_SCALARS = {name: f.tensorboard for name, f in RECORD_FIELDS.items() if f.tensorboard is not None}


class Observer(Protocol):
    def start(self, path: Path, exp: Experiment) -> None: ...

    def record(self, record: Mapping[str, Any]) -> None: ...

    def finish(self) -> None: ...


class ObservedRunDir(RunDir):
    """A run directory that also passes each record to ``observers`` (after writing it)."""

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False,
                 observers: Sequence[Observer] = ()) -> None:
        super().__init__(path, overwrite=overwrite, resume=resume)
        self.observers = list(observers)

    def start(self, exp: Experiment) -> None:
        super().start(exp)
        for o in self.observers:
            o.start(self.path, exp)

    def rewrite_metrics(self, records: list[Mapping[str, Any]]) -> None:
        """On resume: the kept records are already logged; observers only catch up on running totals."""
        super().rewrite_metrics(records)  # type: ignore[misc]
        for o in self.observers:
            replay = getattr(o, "replay", None)
            if replay is not None:
                replay(records)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        super().append_metrics(record)
        for o in self.observers:
            o.record(record)

    def finish(self, exp: Experiment, summary: Mapping[str, Any]) -> None:
        super().finish(exp, summary)
        for o in self.observers:
            o.finish()


def summary_writer_class() -> Any:
    """torch's SummaryWriter, or a :class:`FedloraError` naming the pip command when tensorboard is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard imports it; check first for a clear message)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FedloraError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_INSTALL}") from None
    return SummaryWriter


class TensorBoardLogger:
    """Writes each round's metrics as scalars to ``<run dir>/tensorboard`` (``tensorboard --logdir`` on a
    compare directory shows every run, named by its folder)."""

    def __init__(self) -> None:
        self._writer_cls = summary_writer_class()  # fail before any work when the package is missing
        self._writer: Any = None
        self._bytes_up = self._bytes_down = 0

    def start(self, path: Path, exp: Experiment) -> None:
        self._writer = self._writer_cls(log_dir=str(path / "tensorboard"))
        c = exp.config
        self._writer.add_text("config", f"{c.method.name} / {c.adapter.kind} on {c.model.name}, {c.data.dataset} "
                                        f"({c.data.partition}, {c.data.num_clients} clients), seed {c.data.seed}")

    def record(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        step = int(record["round"])
        for key, tag in _SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tag, float(value), step)
        self._bytes_up += int(record.get("bytes_up") or 0)
        self._bytes_down += int(record.get("bytes_down") or 0)
        self._writer.add_scalar("bytes/up_total", self._bytes_up, step)
        self._writer.add_scalar("bytes/down_total", self._bytes_down, step)
        self._writer.flush()

    def replay(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._bytes_up = sum(int(r.get("bytes_up") or 0) for r in records)
        self._bytes_down = sum(int(r.get("bytes_down") or 0) for r in records)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class RoundBar:
    """Advances a shared tqdm bar by one for each record (one per evaluated or trained round)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def start(self, path: Path, exp: Experiment) -> None:
        self.bar.set_postfix_str(path.name)

    def record(self, record: Mapping[str, Any]) -> None:
        self.bar.update(1)

    def finish(self) -> None:
        pass
