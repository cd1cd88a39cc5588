"""What fedlora puts in a Flower message, and how it is read back: no rule, only encoding.

A message's content is a Flower ``RecordDict``:

- ``fedlora`` (ConfigRecord): the client id, the round and how many broadcasts follow;
- ``b<i>.<field>``: the i-th pending :class:`~fedlora.methods.Broadcast`, one record per field (tensor mappings
  as ArrayRecords keyed by PEFT saved names or base-parameter names, scalars in ``b<i>.meta``);
- in a reply to ``train``: ``upload`` (ArrayRecord: exactly the keys the method shares) and ``meta``
  (ConfigRecord: num_examples, train_loss, fingerprint: what the server needs to validate and weight);
- in a reply to ``evaluate``: ``metrics`` (MetricRecord: acc, f1, loss, n);
- in both replies: ``timing`` (ConfigRecord: ``compute_s``, the ClientApp's own seconds, for the message log).

Broadcast fields are encoded generically (by value type), so a field added to Broadcast travels without a
change here. Arrays are float32 as held by the clients; ``numpy.save`` framing adds ~128 bytes per array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.errors import FedloraError
from fedlora.protocol import BaseUpdate, Broadcast, Upload

HEADER = "fedlora"
_SCALARS = (bool, int, float, str)


def to_arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors keyed by name → ArrayRecord (keys kept: never matched by position)."""
    record = ArrayRecord()
    for key, t in tensors.items():
        record[key] = Array.from_numpy_ndarray(t.detach().to("cpu").contiguous().numpy())
    return record


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(a.numpy(), copy=True)) for key, a in record.items()}


def _is_tensor_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


def put_broadcasts(content: RecordDict, broadcasts: Sequence[Broadcast]) -> None:
    """Add ``broadcasts`` (in order) to ``content``."""
    for i, b in enumerate(broadcasts):
        meta = ConfigRecord()
        for f in dataclasses.fields(b):
            value = getattr(b, f.name)
            if value is None:
                continue
            if isinstance(value, _SCALARS):
                meta[f.name] = value
            elif isinstance(value, BaseUpdate):  # its one flat layout (fedlora.protocol)
                content[f"b{i}.{f.name}"] = to_arrays(value.to_tensors())
            elif _is_tensor_map(value):
                content[f"b{i}.{f.name}"] = to_arrays(value)
            elif isinstance(value, Mapping):  # stats: name → number
                content[f"b{i}.{f.name}"] = MetricRecord({k: float(v) for k, v in value.items()})
            else:
                raise TypeError(f"Broadcast.{f.name} of type {type(value).__name__} cannot be sent")
        content[f"b{i}.meta"] = meta


def get_broadcasts(content: RecordDict) -> list[Broadcast]:
    count = int(content[HEADER]["broadcasts"])
    known = {f.name for f in dataclasses.fields(Broadcast)}
    typed = {f.name for f in dataclasses.fields(Broadcast) if f.default_factory is BaseUpdate}  # type: ignore[comparison-overlap]
    out = []
    for i in range(count):
        kwargs: dict[str, Any] = dict(content[f"b{i}.meta"])
        prefix = f"b{i}."
        for name, record in content.items():
            if not name.startswith(prefix) or name == f"b{i}.meta":
                continue
            field = name[len(prefix):]
            kwargs[field] = from_arrays(record) if isinstance(record, ArrayRecord) else dict(record)
            if field in typed:
                kwargs[field] = BaseUpdate.from_tensors(kwargs[field])
        unknown = set(kwargs) - known
        if unknown:
            raise FedloraError(f"broadcast fields {sorted(unknown)} are unknown to this fedlora version: run the "
                               "same fedlora version on the SuperLink and on every SuperNode")
        out.append(Broadcast(**kwargs))
    return out


def request(kind: str, client: int, round_: int, broadcasts: Sequence[Broadcast] = (),
            extra: Mapping[str, Any] | None = None) -> RecordDict:
    """The content of a server → client message."""
    header = ConfigRecord({"client": client, "round": round_, "broadcasts": len(broadcasts), "kind": kind})
    for k, v in (extra or {}).items():
        header[k] = v
    content = RecordDict({HEADER: header})
    put_broadcasts(content, broadcasts)
    return content


def upload_reply(upload: Upload, shared: Sequence[str]) -> RecordDict:
    """A train reply. Refuses (before anything is sent) a payload with a key the method does not share."""
    private = sorted(set(upload.payload) - set(shared))
    if private:
        raise FedloraError(f"refusing to send non-shared keys {private[:3]}: they stay on this node")
    meta = ConfigRecord({"client": upload.client, "num_examples": int(upload.num_examples)})
    for k, v in upload.meta.items():
        if v is not None:
            meta[k] = v if isinstance(v, _SCALARS) else str(v)
    return RecordDict({"upload": to_arrays(upload.payload), "meta": meta})


def read_upload(content: RecordDict, client: int) -> Upload:
    meta = dict(content["meta"])
    sender = int(meta.pop("client"))
    if sender != client:
        raise FedloraError(f"the SuperNode serving client {client} answered as client {sender}")
    num_examples = meta.pop("num_examples")
    return Upload(client, from_arrays(content["upload"]), int(num_examples), meta)


def message_nbytes(message: Message) -> int:
    """Bytes of a message as Flower serialises it for the wire: every object of its tree (the message, its
    records, each array with its numpy header), without transport framing (HTTP, protobuf envelope)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def array_keys(content: RecordDict) -> dict[str, list[str]]:
    """Record name → array keys, for the message log."""
    return {name: list(record.keys()) for name, record in content.items() if isinstance(record, ArrayRecord)}
