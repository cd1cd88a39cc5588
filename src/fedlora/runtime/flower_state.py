"""What a SuperNode keeps on disk so that a Flower federation can be resumed (docs/flower.md, "Resume").

Flower keeps a ClientApp's ``context.state`` in the SuperNode's memory, per Flower run: it is lost when the
SuperNode restarts, and a resumed federation is a new Flower run. So after every message it completes, a node
also writes its client's whole state (shared and private tensors, the broadcast version it has applied, and the
base weights FedEx / FLoRA changed) to its state folder, one file per round, atomically (temporary file, fsync,
rename). The file of round t is the client's state after its last message of round t.

A node then serves a message of round t from the state the server expects: after round t − 1 for a ``train``
message, after round t for an ``evaluate`` message. Its in-memory state is used when it is not later than that;
otherwise (a SuperNode that restarted, a resumed federation, a train message sent again) the latest file not
later than that is loaded, and with none the client starts from its initial state. Files carry the federation
id (a random id the launcher draws for a run directory and keeps across resumes), so the files of an earlier
federation in the same folder are never used. The two latest rounds are kept (and any later one removed when
a round is written again): a server checkpoint is never more than one round behind a node.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

KEEP = 2  # rounds of files a node keeps
_FILE = re.compile(r"round-(\d+)\.safetensors")


@dataclass(frozen=True)
class Snapshot:
    round: int
    version: int
    state: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]


def default_state_dir(adapter_dir: Path) -> Path:
    """Next to the adapter folder, not inside it: the final adapter replaces that folder whole."""
    return adapter_dir.with_name(adapter_dir.name + ".state")


def save_snapshot(folder: Path, federation: str, client: int, round_: int, version: int,
                  state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Path:
    """Write the client's state after its last message of ``round_`` (atomically); drop files older than the
    :data:`KEEP` latest rounds. Returns the file."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"state/{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    tensors.update({f"base/{k}": v.detach().cpu().contiguous() for k, v in base.items()})
    meta = {"federation": federation, "client": client, "round": round_, "version": version}
    data = save(tensors, metadata={"fedlora_node": json.dumps(meta)})
    path = folder / f"round-{round_}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    # Keep the KEEP latest rounds up to this one; a file of a later round is stale (a round this client is
    # doing again after a resume, or another federation's) and would only be skipped: remove it.
    earlier = sorted(r for r in _rounds(folder) if r <= round_)
    for old in earlier[:-KEEP] + [r for r in _rounds(folder) if r > round_]:
        (folder / f"round-{old}.safetensors").unlink(missing_ok=True)
    return path


def _rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(m.group(1)) for p in folder.iterdir() if (m := _FILE.fullmatch(p.name))]


def load_snapshot(folder: Path, federation: str, client: int, at_most: int) -> Snapshot | None:
    """The latest snapshot of ``client`` in this federation whose round is at most ``at_most``, or None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    for round_ in sorted((r for r in _rounds(folder) if r <= at_most), reverse=True):
        path = folder / f"round-{round_}.safetensors"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("fedlora_node", "{}"))
            tensors = load_file(str(path))
        except (OSError, ValueError, json.JSONDecodeError):
            continue  # unreadable: an older file may still serve
        if meta.get("federation") != federation or meta.get("client") != client:
            continue
        state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
        base = {k[len("base/"):]: v for k, v in tensors.items() if k.startswith("base/")}
        return Snapshot(round=int(meta["round"]), version=int(meta["version"]), state=state, base=base)
    return None


def needed_round(kind: str, round_: int) -> int:
    """The latest round whose end state may serve a message: a train message of round t must start from the
    state after round t − 1; an evaluate (or save) message may see the state after round t's training."""
    return round_ - 1 if kind == "train" else round_
