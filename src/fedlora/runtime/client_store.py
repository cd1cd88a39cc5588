"""Client states on disk (``train.client_states = "disk"``): with 1,000 clients and 10 per round, the embedded
runtime holds in memory only the clients it is training or evaluating, not every client's adapter.

One safetensors file per client, ``<dir>/<client>.safetensors``, written atomically (temporary file, fsync,
rename) each time the client's state changes, with a SHA-256 of its content in its metadata (checked on every
read). It holds the client's whole state: the shared adapter, its private tensors (FedSA's B side and head), and
a private second adapter (FedDPA's local one); tensors are read back bit for bit.

Checkpoints and resume. A checkpoint after round r does not copy these files; it records each client's *stamp*:
the epoch its state was written in. An epoch is the span after one checkpoint and up to the next (the runtime
passes it: the last checkpointed round + 1, 0 before the first), so every state a checkpoint refers to has a
stamp <= r, and a state written after it (by the round a crash interrupted) has a larger one. A file keeps two
sections: ``cur``, the latest state, and ``prev``, the latest state of an earlier epoch. When a client is
written again in a later epoch, its ``cur`` becomes ``prev``; within one epoch only ``cur`` is replaced. So at
any instant the file holds the state the last checkpoint refers to, and a resume reads the section whose stamp
the checkpoint names (:meth:`ClientStore.restore`); a file that no longer holds it (a checkpoint older than the
last one put back by hand) is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from fedlora.adapters import State
from fedlora.errors import FedloraError
from fedlora.storage import StorageError, atomic_write, describe_os_error

SECTIONS = ("cur", "prev")


class ClientStateMissing(FedloraError):
    """A client's state file is missing, damaged, or no longer holds the state a checkpoint refers to."""


def _digest(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata text and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ClientStore:
    """Each client's state in its own file under ``directory``; ``stamps`` (client → epoch of its ``cur`` state
    as this process knows it) is all that stays in memory. ``durable``: fsync each file (a run directory; a
    store in a temporary folder skips it)."""

    def __init__(self, directory: Path, durable: bool = True) -> None:
        self.directory = directory
        self.durable = durable
        self.stamps: dict[int, int] = {}  # the folder is made at the first write (after the run directory's checks)

    def path(self, client: int) -> Path:
        return self.directory / f"{client}.safetensors"

    def __contains__(self, client: object) -> bool:
        return client in self.stamps

    def _load(self, client: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        path = self.path(client)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
            meta_json, stored = header["meta"], header["sha256"]
        except FileNotFoundError:
            raise ClientStateMissing(f"client {client}'s state file {str(path)!r} is missing") from None
        except Exception as e:  # safetensors' own errors for truncated or garbled files, or a missing key
            raise ClientStateMissing(f"client {client}'s state file {str(path)!r} is damaged ({type(e).__name__}: "
                                     f"{str(e)[:120]})") from None
        if _digest(meta_json, tensors) != stored:
            raise ClientStateMissing(f"client {client}'s state file {str(path)!r} is damaged: its checksum does "
                                     "not match its content")
        return json.loads(meta_json), tensors

    def read(self, client: int, stamp: int | None = None) -> tuple[State, int]:
        """(state, version of the last broadcast applied) of ``client``: the section stamped ``stamp``, else
        (None) the one this process last wrote."""
        want = self.stamps[client] if stamp is None else stamp
        meta, tensors = self._load(client)
        for section in SECTIONS:
            info = meta.get(section)
            if info is not None and info["stamp"] == want:
                prefix = f"{section}/"
                return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, int(info["version"])
        raise self._not_held(client, meta, want)

    def _not_held(self, client: int, meta: Mapping[str, Any], want: int) -> ClientStateMissing:
        held = [meta[s]["stamp"] for s in SECTIONS if meta.get(s) is not None]
        return ClientStateMissing(f"client {client}'s state file {str(self.path(client))!r} holds the states of "
                                  f"epochs {held}, not epoch {want} that the checkpoint refers to (was an older "
                                  "checkpoint put back?); start the run again with --overwrite")

    def write(self, client: int, state: Mapping[str, torch.Tensor], version: int, stamp: int) -> None:
        """Store ``state`` as ``client``'s current state of epoch ``stamp``, atomically; the state of the epoch
        before (what the last checkpoint may refer to) is kept in the same file."""
        sections: dict[str, tuple[Mapping[str, torch.Tensor], dict[str, int]]] = {
            "cur": (state, {"stamp": stamp, "version": version})}
        if client in self.stamps:
            meta, tensors = self._load(client)
            last = self.stamps[client]
            # A later epoch: the state of epoch ``last`` becomes prev. The same epoch: prev stays what it was.
            keep = next((s for s in SECTIONS if meta.get(s) and meta[s]["stamp"] == last), None) if last < stamp \
                else ("prev" if meta.get("prev") else None)
            if keep is not None:
                prefix = f"{keep}/"
                sections["prev"] = ({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                    dict(meta[keep]))
        out = {f"{s}/{k}": v.detach().contiguous().cpu() for s, (st, _) in sections.items() for k, v in st.items()}
        meta_json = json.dumps({s: info for s, (_, info) in sections.items()})
        data = save(out, metadata={"meta": meta_json, "sha256": _digest(meta_json, out)})
        if not self.stamps:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create {str(self.directory)!r}: {describe_os_error(e)}") from None
        if self.durable:
            atomic_write(self.path(client), data)
        else:
            tmp = self.path(client).with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path(client))
        self.stamps[client] = stamp

    def restore(self, stamps: Mapping[int, int]) -> None:
        """Take the stamps a checkpoint recorded, after checking (from each file's header) that every file is there
        and holds its stamp; the content's checksum is checked when the client is read."""
        self.stamps = {int(c): int(s) for c, s in stamps.items()}
        missing = [c for c in self.stamps if not self.path(c).is_file()]
        if missing:
            raise ClientStateMissing(f"{len(missing)} client state file(s) the checkpoint refers to are missing "
                                     f"from {str(self.directory)!r} (first: client {missing[0]}); start the run "
                                     "again with --overwrite")
        for client, stamp in self.stamps.items():
            try:
                with safe_open(str(self.path(client)), framework="pt") as f:
                    meta = json.loads((f.metadata() or {})["meta"])
            except Exception as e:  # a garbled header or no metadata
                raise ClientStateMissing(f"client {client}'s state file {str(self.path(client))!r} is damaged "
                                         f"({type(e).__name__}); start the run again with --overwrite") from None
            if all(meta.get(s) is None or meta[s]["stamp"] != stamp for s in SECTIONS):
                raise self._not_held(client, meta, stamp)
