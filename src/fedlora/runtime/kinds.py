"""The built-in runtimes, registered in :data:`fedlora.registry.RUNTIMES`: where the clients run.

A runtime is an object with ``name``, ``description`` and ``run(config, out, progress, exp, resume)``, which
returns the run's summary. Light to import: each runtime's implementation loads inside its ``run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlora.registry import RUNTIMES

if TYPE_CHECKING:
    from fedlora.config import Config
    from fedlora.experiment import Experiment
    from fedlora.report import RunDir


class Simulation:
    name = "simulation"
    description = "every client in this process, on one shared model (the embedded simulation)"
    resumable = True

    def run(self, config: Config, out: RunDir | None, progress: bool = True, exp: Experiment | None = None,
            resume: bool = False) -> dict[str, Any]:
        from fedlora.runtime.simulation import run

        return run(config, out, progress=progress, exp=exp, resume=resume)


class Flower:
    name = "flower"
    description = "Flower deployment engine: a SuperLink and one SuperNode per client on 127.0.0.1 (docs/flower.md)"
    resumable = True  # the ServerApp checkpoints the server; every SuperNode files its client's state

    def run(self, config: Config, out: RunDir | None, progress: bool = True, exp: Experiment | None = None,
            resume: bool = False) -> dict[str, Any]:
        from fedlora.errors import FedloraError
        from fedlora.runtime.flower_launch import run_local

        if out is None:
            raise FedloraError("runtime.kind = 'flower' writes its results through a run directory: give out=")
        if exp is not None:
            raise FedloraError("runtime.kind = 'flower' builds the experiment in its ServerApp and on every "
                               "SuperNode; do not pass exp=")
        summary: dict[str, Any] = run_local(config, out, progress=progress, resume=resume)
        return summary


RUNTIMES.register(Simulation())
RUNTIMES.register(Flower())
