"""Checkpoints: everything needed to continue a run after the last complete round, in one file written
atomically (temporary file, fsync, rename) after every round.

One safetensors file holds every tensor (the server's global adapter and pending broadcasts, every client's
state including its private side, and the base weights that FedEx / FLoRA changed); its metadata holds the
rest as JSON (round, versions, the metrics so far, elapsed time). There is no other random state to save:
every random draw of a round (client sampling, batches, dropout, injected faults) is derived from
(seed, round, client), so a resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save

from fedlora.errors import FedloraError
from fedlora.methods import Broadcast
from fedlora.report import atomic_write
from fedlora.server import Server

FILE = "state.safetensors"
FORMAT = 1


@dataclass
class Checkpoint:
    round: int
    records: list[dict[str, Any]]
    elapsed: float
    clients: dict[int, dict[str, torch.Tensor]]
    client_versions: dict[int, int]
    base: dict[str, torch.Tensor]


def maybe_kill(point: str, round_: int) -> None:
    """Test hook: ``FEDLORA_TEST_KILL_AT=point:round`` SIGKILLs this process there (crash-safety tests)."""
    target = os.environ.get("FEDLORA_TEST_KILL_AT")
    if target and target == f"{point}:{round_}":
        os.kill(os.getpid(), signal.SIGKILL)


def _history_meta(b: Broadcast) -> dict[str, Any]:
    return {"reset_adapter": b.reset_adapter, "stats": dict(b.stats), "base_update_nbytes": b.base_update_nbytes,
            "version": b.version}


def save_checkpoint(directory: Path, round_: int, server: Server, clients: Mapping[int, Mapping[str, torch.Tensor]],
                    client_versions: Mapping[int, int], base: Mapping[str, torch.Tensor],
                    records: list[dict[str, Any]], elapsed: float) -> None:
    """Write the state after ``round_`` as ``directory/state.safetensors``, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in server.global_state.items():
        tensors[f"global/{k}"] = v
    for name, state in server.rank_states.items():
        for k, v in state.items():
            tensors[f"rank/{name}/{k}"] = v
    for j, b in enumerate(server.history):
        for k, v in b.payload.items():
            tensors[f"history/{j}/payload/{k}"] = v
        for k, v in b.base_update.items():
            tensors[f"history/{j}/base/{k}"] = v
    for cid, state in clients.items():
        for k, v in state.items():
            tensors[f"client/{cid}/{k}"] = v
    for k, v in base.items():
        tensors[f"base/{k}"] = v
    meta = {"format": FORMAT, "round": round_, "version": server.version, "first": server.first,
            "client_version": server.client_version, "history": [_history_meta(b) for b in server.history],
            "client_versions": {str(c): v for c, v in client_versions.items()}, "records": records,
            "elapsed": elapsed}
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta)})
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / FILE, data, before_rename=lambda: maybe_kill("checkpoint-write", round_))


def load_checkpoint(directory: Path, server: Server) -> Checkpoint:
    """Read a checkpoint and restore ``server`` from it; returns the clients' and base weights' state."""
    path = directory / FILE
    if not path.is_file():
        raise FedloraError(f"no checkpoint at {str(path)!r}: the run stopped before its first round completed; "
                           "start it again with --overwrite")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    if meta.get("format") != FORMAT:
        raise FedloraError(f"checkpoint {str(path)!r} has format {meta.get('format')}, expected {FORMAT}")
    tensors = load_file(str(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        head, rest = name.split("/", 1)
        if head in ("client", "history", "rank"):
            idx, rest = rest.split("/", 1)
            head = f"{head}/{idx}"
        groups.setdefault(head, {})[rest] = t

    server.global_state = groups.get("global", {})
    server._reference = {k: server.global_state[k] for k in server._reference}
    for name in server.rank_states:
        if f"rank/{name}" not in groups:
            raise FedloraError(f"checkpoint {str(path)!r} has no state for the rank adapter {name!r}: it was written "
                               "by a run with other adapter ranks")
        server.rank_states[name] = groups[f"rank/{name}"]
    history = []
    for j, hm in enumerate(meta["history"]):
        g = groups.get(f"history/{j}", {})
        payload = {k[len("payload/"):]: v for k, v in g.items() if k.startswith("payload/")}
        base_update = {k[len("base/"):]: v for k, v in g.items() if k.startswith("base/")}
        history.append(replace(Broadcast(payload=payload, base_update=base_update), **hm))
    server.history = history
    server.version, server.first = meta["version"], meta["first"]
    server.client_version = list(meta["client_version"])
    clients = {int(k.split("/", 1)[1]): v for k, v in groups.items() if k.startswith("client/")}
    return Checkpoint(round=meta["round"], records=meta["records"], elapsed=meta["elapsed"], clients=clients,
                      client_versions={int(c): v for c, v in meta["client_versions"].items()},
                      base=groups.get("base", {}))
