"""Checkpoints: everything needed to continue a run after the last complete round, in one file written
atomically (temporary file, fsync, rename) after every round.

Integrity: the metadata carries a SHA-256 over the metadata itself and every tensor (name, dtype, shape, bytes),
so a truncated file or a flipped bit is refused instead of silently resumed. The checkpoint of the round before
is kept as ``previous.safetensors`` (a hard link, then a rename, so a valid ``state.safetensors`` exists at every
instant); when the newest is damaged, the error says how to continue from it. The resolved config the run was
started with is stored too, so that a resume can refuse a config that no longer matches the saved state.

One safetensors file holds every tensor (the server's global adapter and pending broadcasts, every client's
state including its private side, and the base weights that FedEx / FLoRA changed); its metadata holds the
rest as JSON (round, versions, the metrics so far, elapsed time). There is no other random state to save:
every random draw of a round (client sampling, batches, dropout, injected faults) is derived from
(seed, round, client), so a resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save

from fedlora.errors import FedloraError
from fedlora.protocol import BaseUpdate, Broadcast
from fedlora.server import Server
from fedlora.storage import StorageError, atomic_write, describe_os_error

FILE = "state.safetensors"
PREVIOUS = "previous.safetensors"
# 3: base updates stored in BaseUpdate's flat layout (fedlora.protocol); 2: "name@P"/"name@Q" keys; 1: no checksum.
FORMAT = 3


class CheckpointDamaged(FedloraError):
    """A checkpoint file is truncated, altered or unreadable."""


@dataclass
class Checkpoint:
    round: int
    records: list[dict[str, Any]]
    elapsed: float
    clients: dict[int, dict[str, torch.Tensor]]
    client_versions: dict[int, int]
    base: dict[str, torch.Tensor]
    # Clients whose state lives in a fedlora.runtime.client_store.ClientStore: client -> the epoch of the state
    # this checkpoint refers to (their tensors are in the store's files, not in ``clients``).
    client_stamps: dict[int, int] = field(default_factory=dict)


def _history_meta(b: Broadcast) -> dict[str, Any]:
    return {"reset_adapter": b.reset_adapter, "stats": dict(b.stats), "version": b.version}


def _digest(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata text and every tensor's name, dtype, shape and raw bytes (in name order)."""
    h = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(directory: Path, round_: int, server: Server, clients: Mapping[int, Mapping[str, torch.Tensor]],
                    client_versions: Mapping[int, int], base: Mapping[str, torch.Tensor],
                    records: list[dict[str, Any]], elapsed: float,
                    config: Mapping[str, Any] | None = None,
                    on_event: Callable[[str, int], None] | None = None,
                    client_stamps: Mapping[int, int] | None = None) -> None:
    """Write the state after ``round_`` as ``directory/state.safetensors``, atomically, keeping the one before as
    ``previous.safetensors``. ``config`` (the resolved config as a dict) is stored for resume checks;
    ``client_stamps``: the clients whose states are in a client store, with the epoch of each (not copied here)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in server.global_state.items():
        tensors[f"global/{k}"] = v
    for name, state in server.rank_states.items():
        for k, v in state.items():
            tensors[f"rank/{name}/{k}"] = v
    for j, b in enumerate(server.history):
        for k, v in b.payload.items():
            tensors[f"history/{j}/payload/{k}"] = v
        for k, v in b.base_update.to_tensors().items():
            tensors[f"history/{j}/base/{k}"] = v
    for cid, state in clients.items():
        for k, v in state.items():
            tensors[f"client/{cid}/{k}"] = v
    for k, v in base.items():
        tensors[f"base/{k}"] = v
    meta = {"format": FORMAT, "round": round_, "version": server.version, "first": server.first,
            "client_version": server.client_version, "history": [_history_meta(b) for b in server.history],
            "client_versions": {str(c): v for c, v in client_versions.items()}, "records": records,
            "elapsed": elapsed, "config": dict(config) if config is not None else None,
            "client_stamps": {str(c): s for c, s in (client_stamps or {}).items()}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta_json = json.dumps(meta)
    data = save(tensors, metadata={"meta": meta_json, "sha256": _digest(meta_json, tensors)})
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create {str(directory)!r}: {describe_os_error(e)}") from None
    current, previous = directory / FILE, directory / PREVIOUS

    def keep_previous() -> None:  # between the fsync of the new file and its rename over the current one
        if on_event is not None:
            on_event("checkpoint-write", round_)  # observers: the crash tests kill the process here
        if current.is_file():
            link = directory / (PREVIOUS + ".tmp")
            link.unlink(missing_ok=True)
            os.link(current, link)
            os.replace(link, previous)

    atomic_write(current, data, before_rename=keep_previous)


def read_checkpoint(directory: Path, name: str = FILE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of a checkpoint, verified against its checksum.

    Raises :class:`CheckpointDamaged` (naming the file, and the previous round's checkpoint when one is kept) for a
    truncated, altered or unreadable file."""
    from safetensors import safe_open

    path = directory / name
    spare = directory / PREVIOUS
    hint = ""
    if name == FILE and spare.is_file():
        hint = (f"; the previous round's checkpoint is kept: to continue from it, run "
                f"mv {str(spare)!r} {str(path)!r} and resume again")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        meta_json = header["meta"]
        meta = json.loads(meta_json)
        stored = header["sha256"]
    except KeyError:
        raise CheckpointDamaged(f"checkpoint {str(path)!r} has no checksum (written by an older fedlora or altered); "
                                f"start the run again with --overwrite{hint}") from None
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointDamaged(f"checkpoint {str(path)!r} is damaged or truncated ({type(e).__name__}: "
                                f"{str(e)[:120]}){hint}") from None
    if _digest(meta_json, tensors) != stored:
        raise CheckpointDamaged(f"checkpoint {str(path)!r} is damaged: its checksum does not match its content{hint}")
    if meta.get("format") != FORMAT:
        raise CheckpointDamaged(f"checkpoint {str(path)!r} has format {meta.get('format')}, this fedlora reads format "
                                f"{FORMAT}: it was written by an older version; finish the run with that version, or "
                                "start it again with --overwrite")
    return meta, tensors


def has_checkpoint(directory: Path) -> bool:
    return (directory / FILE).is_file()


def load_checkpoint(directory: Path, server: Server) -> Checkpoint:
    """Read a checkpoint and restore ``server`` from it; returns the clients' and base weights' state."""
    path = directory / FILE
    if not path.is_file():
        raise FedloraError(f"no checkpoint at {str(path)!r}: the run stopped before its first round completed; "
                           "start it again with --overwrite")
    meta, tensors = read_checkpoint(directory)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        head, rest = name.split("/", 1)
        if head in ("client", "history", "rank"):
            idx, rest = rest.split("/", 1)
            head = f"{head}/{idx}"
        groups.setdefault(head, {})[rest] = t

    server.global_state = groups.get("global", {})
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
        history.append(replace(Broadcast(payload=payload, base_update=BaseUpdate.from_tensors(base_update)), **hm))
    server.history = history
    server.version, server.first = meta["version"], meta["first"]
    server.client_version = list(meta["client_version"])
    clients = {int(k.split("/", 1)[1]): v for k, v in groups.items() if k.startswith("client/")}
    return Checkpoint(round=meta["round"], records=meta["records"], elapsed=meta["elapsed"], clients=clients,
                      client_versions={int(c): v for c, v in meta["client_versions"].items()},
                      base=groups.get("base", {}),
                      client_stamps={int(c): s for c, s in meta.get("client_stamps", {}).items()})
