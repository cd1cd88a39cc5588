"""What every runtime does the same way, written once: the server built from an experiment, and a base update
applied to a model. The embedded runtime and the Flower apps import these from here, never from each other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedlora.protocol import BaseUpdate
from fedlora.server import Server

if TYPE_CHECKING:
    from fedlora.experiment import Experiment
    from fedlora.faults import FaultyTransport


def make_server(exp: Experiment) -> Server:
    """The server of an experiment: its method, initial adapter(s), sampling, validation bounds."""
    t = exp.config.train
    return Server(exp.method, exp.init_state, len(exp.clients), exp.config.clients_per_round, t.min_clients,
                  t.seed, exp.fingerprint, t.max_update_norm_ratio,
                  client_adapters=[exp.client_adapters[c.client_id] for c in exp.clients], init_states=exp.init_states)


def apply_base_update(model: torch.nn.Module, update: BaseUpdate) -> None:
    """Add each delta to the base parameter of the same name (in that parameter's own orientation)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in update.materialize().items():
            params[name].add_(delta.to(params[name].device, params[name].dtype))


def injected_from(records: list[dict[str, Any]], transport: FaultyTransport) -> dict[str, int]:
    """Faults injected over the whole run, recomputed from the seeded draws (so a resumed run counts all)."""
    from fedlora.faults import KINDS, draw

    counts = dict.fromkeys(KINDS, 0)
    cfg = transport.cfg
    for r in records:
        if r["round"] == 0:
            continue
        chosen = r["participants"] + [m["client"] for m in r["rejected"]] + [
            m["client"] for m in r["missing"] if not m["reason"].startswith("evaluation")]
        for c in chosen:
            d = draw(cfg, r["round"], c)
            for k in KINDS:
                counts[k] += int(getattr(d, k) and not (k != "crash" and d.crash))
    return counts
