"""The server: client sampling, validation of every upload, aggregation through the method, and the record of
which broadcasts each client has received. Runtime-agnostic: the embedded simulation and the Flower ServerApp
both drive this object; neither contains a rule of its own.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import torch

from fedlora.adapters import State
from fedlora.errors import RoundFailed, UpdateRejected
from fedlora.methods import Broadcast, Method, Upload


class Server:
    """Holds the global adapter state and the broadcast history of one experiment."""

    def __init__(self, method: Method, init_state: Mapping[str, torch.Tensor], num_clients: int,
                 clients_per_round: int, min_clients: int, seed: int, fingerprint: str | None = None,
                 max_update_norm_ratio: float = 0.0, client_adapters: Sequence[str] | None = None,
                 init_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
        self.method = method
        self.global_state: State = {k: v.detach().clone() for k, v in init_state.items()}
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.seed = seed
        self.fingerprint = fingerprint
        self.max_update_norm_ratio = max_update_norm_ratio
        self.version = 0
        # Broadcasts some client may still need: history[i] is broadcast number first + i. Non-cumulative
        # methods keep only the latest; cumulative ones keep those the most-behind client has not received.
        self.history: list[Broadcast] = []
        self.first = 1
        self.client_version = [0] * num_clients  # the property below also counts clients per version
        # Per-client ranks: each client's uploads are checked against the state a client of its rank starts
        # the round from (the initial state of its PEFT adapter with every broadcast applied), not the global
        # adapter's shapes. ``rank_states`` holds those states for every adapter but "default".
        self.client_adapters = list(client_adapters) if client_adapters is not None else ["default"] * num_clients
        self.rank_states: dict[str, State] = {
            name: {k: v.detach().clone() for k, v in state.items()}
            for name, state in (init_states or {}).items() if name != "default" and name in self.client_adapters}

    # ---- who takes part ------------------------------------------------------------------------------
    def sample(self, round_: int) -> list[int]:
        """The clients of a round: a seeded draw of k without replacement, or each client with probability k/N
        when the method's ``sampling`` is "poisson"; sorted (all of them when k = N)."""
        if self.clients_per_round >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, round_, 0x5A3])
        if self.method.sampling == "poisson":  # each client with probability k/N (central DP's accountant)
            draw = rng.random(self.num_clients)
            return [c for c in range(self.num_clients) if draw[c] < self.clients_per_round / self.num_clients]
        return sorted(int(c) for c in rng.choice(self.num_clients, self.clients_per_round, replace=False))

    # ---- what a client must receive ------------------------------------------------------------------
    def pending(self, client: int) -> list[Broadcast]:
        """Broadcasts ``client`` has not received: all of them for cumulative methods, else the latest."""
        have = self.client_version[client]
        if have == self.version:
            return []
        due = self.history[have + 1 - self.first:] if self.method.cumulative else [self.history[-1]]
        return [self.method.deliver(b, self.state_of(client)) for b in due]  # what is sent to this client's rank

    def state_of(self, client: int) -> Mapping[str, torch.Tensor]:
        """The adapter state a client of ``client``'s rank holds (the global one unless ranks differ)."""
        adapter = self.client_adapters[client] if 0 <= client < self.num_clients else "default"
        return self.global_state if adapter == "default" else self.rank_states[adapter]

    @property
    def client_version(self) -> list[int]:
        """The last broadcast each client received (read-only list; :meth:`mark_synced` changes it)."""
        return self._client_version

    @client_version.setter
    def client_version(self, versions: list[int]) -> None:
        self._client_version = list(versions)
        # clients per version: the oldest version still held is found in O(versions), not O(clients), so that
        # syncing every client of a round costs O(clients · rounds) rather than O(clients²)
        self._version_count = Counter(self._client_version)

    def mark_synced(self, client: int) -> None:
        old = self._client_version[client]
        self._version_count[old] -= 1
        if not self._version_count[old]:
            del self._version_count[old]
        self._client_version[client] = self.version
        self._version_count[self.version] += 1
        self._trim()

    def _trim(self) -> None:
        oldest_needed = min(self._version_count) + 1 if self.method.cumulative else self.version
        drop = max(0, min(oldest_needed - self.first, len(self.history) - 1))
        if drop:
            del self.history[:drop]
            self.first += drop

    # ---- validation ----------------------------------------------------------------------------------
    def reference(self, client: int, round_: int) -> Mapping[str, torch.Tensor]:
        """The tensors ``client`` uploads in round ``round_`` (the method's plan for that round), as it started the
        round (shapes of its rank): what its upload is checked against."""
        state = self.state_of(client)
        return {k: state[k] for k in self.method.plan(round_).upload}

    def validate(self, upload: Upload, round_: int) -> None:
        """Raise :class:`UpdateRejected` unless the upload has exactly the keys of the round's plan, the reference
        shapes (of the client's rank) and dtypes, only finite values, a positive example count and the expected
        VeRA projections."""
        if not (isinstance(upload.client, int) and 0 <= upload.client < self.num_clients):
            raise UpdateRejected(upload.client, f"client id {upload.client!r} is not one of 0..{self.num_clients - 1}")
        reference = self.reference(upload.client, round_)
        keys = set(upload.payload)
        expected = set(reference)
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            raise UpdateRejected(upload.client, f"keys differ from round {round_}'s upload plan (missing {missing[:3]}, "
                                                f"unexpected {extra[:3]})")
        if not (isinstance(upload.num_examples, int) and upload.num_examples > 0):
            raise UpdateRejected(upload.client, f"num_examples = {upload.num_examples!r} must be a positive integer")
        for k, ref in reference.items():
            t = upload.payload[k]
            if not isinstance(t, torch.Tensor):
                raise UpdateRejected(upload.client, f"{k} is not a tensor")
            if tuple(t.shape) != tuple(ref.shape):
                raise UpdateRejected(upload.client, f"{k} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise UpdateRejected(upload.client, f"{k} has dtype {t.dtype}, expected {ref.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise UpdateRejected(upload.client, f"{k} has non-finite values")
        if self.fingerprint is not None and upload.meta.get("fingerprint") != self.fingerprint:
            raise UpdateRejected(upload.client, "VeRA projections differ from the server's (same adapter.seed "
                                                "and model are required on every client)")

    def screen(self, uploads: Sequence[Upload], round_: int) -> tuple[list[Upload], list[UpdateRejected]]:
        """Round-level check after :meth:`validate`: with ``max_update_norm_ratio`` = c > 0, reject every update
        whose distance from the current global state exceeds c × the median distance of the round."""
        if self.max_update_norm_ratio <= 0 or len(uploads) < 3:  # a median of fewer than 3 protects nothing
            return list(uploads), []
        norms = [math.sqrt(sum(float((u.payload[k].double() - ref[k].double()).pow(2).sum()) for k in ref))
                 for u in uploads for ref in [self.reference(u.client, round_)]]
        bound = self.max_update_norm_ratio * float(np.median(norms))
        kept, rejected = [], []
        for u, n in zip(uploads, norms):
            if n > bound:
                rejected.append(UpdateRejected(u.client, f"update norm {n:.3g} exceeds {self.max_update_norm_ratio:g} "
                                                          f"× the round's median ({bound:.3g})"))
            else:
                kept.append(u)
        return kept, rejected

    # ---- aggregation ---------------------------------------------------------------------------------
    def aggregate(self, uploads: Sequence[Upload]) -> Broadcast:
        """Aggregate validated uploads into a new broadcast, or raise :class:`RoundFailed` (nothing changes)."""
        if len(uploads) < self.min_clients:
            raise RoundFailed(f"{len(uploads)} valid update(s), fewer than train.min_clients = {self.min_clients}")
        broadcast = replace(self.method.aggregate(uploads, self.global_state), version=self.version + 1)
        bad = [k for k, v in broadcast.payload.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise RoundFailed(f"aggregation produced non-finite values in {bad[:3]}")
        self.global_state = self.method.apply(self.global_state, broadcast)
        self.rank_states = {name: self.method.apply(state, self.method.deliver(broadcast, state))
                            for name, state in self.rank_states.items()}
        self.history.append(broadcast)
        self.version += 1
        self._trim()
        return broadcast


def weighted_mean_metric(values: Sequence[float], weights: Sequence[float]) -> float:
    """Example-weighted mean that ignores NaN entries (clients without test examples)."""
    pairs = [(v, w) for v, w in zip(values, weights) if not math.isnan(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")
