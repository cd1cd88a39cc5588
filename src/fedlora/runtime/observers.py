"""Observers of a run: what watches the round loop without the loop knowing it (progress bars, crash-test kill
switches). TensorBoard and the metrics file observe through the run directory (:mod:`fedlora.runlog`).

The loop reports two things: each round's record (``record``) and named points inside a round (``event``:
``fit`` after a client's upload arrived, ``aggregate`` after the broadcast was made; the runtime adds
``metrics`` after a record was written, the checkpoint ``checkpoint-write`` before its rename, the run directory
``adapter-write`` before an adapter folder is renamed into place).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Mapping, Protocol, Sequence

Event = Callable[[str, int], None]


class RoundObserver(Protocol):
    def event(self, point: str, round_: int) -> None: ...

    def record(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class KillSwitch:
    """Crash-safety tests: ``FEDLORA_TEST_KILL_AT=point:round`` SIGKILLs this process at that point."""

    def __init__(self, target: str) -> None:
        self.target = target

    @classmethod
    def from_env(cls) -> KillSwitch | None:
        target = os.environ.get("FEDLORA_TEST_KILL_AT")
        return cls(target) if target else None

    def event(self, point: str, round_: int) -> None:
        if self.target == f"{point}:{round_}":
            os.kill(os.getpid(), signal.SIGKILL)

    def record(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class ProgressBar:
    """One tqdm bar over a run's rounds, showing the last training loss and personalized accuracy."""

    def __init__(self, total: int, initial: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="round", leave=True, dynamic_ncols=True)

    def event(self, point: str, round_: int) -> None:
        pass

    def record(self, record: Mapping[str, Any]) -> None:
        if record["round"] == 0:
            return
        self.bar.update(1)
        shown = {"loss": record.get("train_loss"), "acc": record.get("acc_personal_mean")}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})

    def close(self) -> None:
        self.bar.close()


class Observers:
    """Several observers as one (what the loop and the runtime call)."""

    def __init__(self, observers: Sequence[RoundObserver] = ()) -> None:
        self.items = [o for o in observers if o is not None]

    def event(self, point: str, round_: int) -> None:
        for o in self.items:
            o.event(point, round_)

    def record(self, record: Mapping[str, Any]) -> None:
        for o in self.items:
            o.record(record)

    def close(self) -> None:
        for o in self.items:
            o.close()


def standard(progress: bool, total: int, done: int, desc: str) -> Observers:
    """What every runtime attaches: a progress bar when asked, and the kill switch when a test set one."""
    items: list[RoundObserver] = []
    if progress:
        items.append(ProgressBar(total, done, desc))
    kill = KillSwitch.from_env()
    if kill is not None:
        items.append(kill)
    return Observers(items)
