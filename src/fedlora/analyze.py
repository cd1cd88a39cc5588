"""``fedlora analyze asymmetry``: the observation FedSA-LoRA is built on.

Every client starts from the same adapter initialisation and trains on its own data only, with no aggregation,
for ``train.rounds × train.local_steps`` steps (``train.rounds`` calls of the same local training as a federated
round, optimizer fresh each call). Then, for every adapted layer, the clients' A-side tensors are compared
pairwise by cosine similarity, and so are their B-side tensors (VeRA: λ_d and λ_b).

Two things are compared, and both are reported:

- the **learned** tensors, as the FedSA-LoRA paper does (its Figure 1): for LoRA, A starts at a random matrix
  shared by every client and B at zero, so the learned A keeps part of its common initialisation;
- their **change from the initialisation** (X_u − X_0), which isolates what each client learned. For LoRA's B
  (X_0 = 0) the two are the same; VeRA's λ_d starts at a constant, so only its change is informative.

Outputs: ``asymmetry.csv`` (one row per layer), ``asymmetry.json`` (means over layers), ``asymmetry.png``
(clients × clients similarity averaged over layers, A beside B, learned above change) and ``config.toml``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedlora import adapters
from fedlora.config import Config, dumps
from fedlora.errors import ConfigError
from fedlora.storage import atomic_write, check_output_dir

CSV_COLUMNS = ("layer", "a_similarity", "b_similarity", "a_change_similarity", "b_change_similarity",
               "a_change_norm", "b_change_norm", "a_init_norm", "b_init_norm", "a_shape", "b_shape")


def pairwise_cosine(tensors: Sequence[Tensor]) -> Tensor:
    """N×N cosine similarities of the flattened tensors, in float64. A tensor of zeros has no direction: its row
    and column are NaN."""
    x = torch.stack([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
    norms = x.norm(dim=1)
    sim = (x @ x.T) / (norms[:, None] * norms[None, :])
    sim[(norms == 0)[:, None] | (norms == 0)[None, :]] = math.nan
    return sim


def mean_pairwise(sim: Tensor) -> float:
    """Mean over client pairs u < v (the diagonal is 1 by definition and is left out); NaN pairs are ignored."""
    n = sim.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    values = sim[iu[0], iu[1]]
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


@dataclass(frozen=True)
class LayerSimilarity:
    """Clients × clients similarities of one adapted layer's A-side and B-side tensors."""

    layer: str
    a_key: str
    b_key: str
    a: Tensor  # learned A_u
    b: Tensor  # learned B_u
    a_change: Tensor  # A_u − A_0
    b_change: Tensor  # B_u − B_0
    a_change_norm: float  # mean over clients of ‖A_u − A_0‖_F
    b_change_norm: float
    a_init_norm: float  # ‖A_0‖_F
    b_init_norm: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    def row(self) -> dict[str, Any]:
        return {"layer": self.layer, "a_similarity": mean_pairwise(self.a), "b_similarity": mean_pairwise(self.b),
                "a_change_similarity": mean_pairwise(self.a_change),
                "b_change_similarity": mean_pairwise(self.b_change),
                "a_change_norm": self.a_change_norm, "b_change_norm": self.b_change_norm,
                "a_init_norm": self.a_init_norm, "b_init_norm": self.b_init_norm,
                "a_shape": "x".join(map(str, self.a_shape)), "b_shape": "x".join(map(str, self.b_shape))}


def layer_similarities(states: Sequence[Mapping[str, Tensor]], init: Mapping[str, Tensor]) -> list[LayerSimilarity]:
    """For every adapted layer (A/B key pair of ``init``), the pairwise similarities across the client ``states``."""
    out = []
    for layer, (a_key, b_key) in adapters.layer_pairs(sorted(init)).items():
        a0, b0 = init[a_key].double(), init[b_key].double()
        a_changes = [s[a_key].double() - a0 for s in states]
        b_changes = [s[b_key].double() - b0 for s in states]
        out.append(LayerSimilarity(
            layer=layer, a_key=a_key, b_key=b_key,
            a=pairwise_cosine([s[a_key] for s in states]), b=pairwise_cosine([s[b_key] for s in states]),
            a_change=pairwise_cosine(a_changes), b_change=pairwise_cosine(b_changes),
            a_change_norm=float(np.mean([float(d.norm()) for d in a_changes])),
            b_change_norm=float(np.mean([float(d.norm()) for d in b_changes])),
            a_init_norm=float(a0.norm()), b_init_norm=float(b0.norm()),
            a_shape=tuple(a0.shape), b_shape=tuple(b0.shape)))
    return out


def train_locally(exp: Any, progress: bool = False) -> list[dict[str, Tensor]]:
    """Each client's adapter after ``train.rounds`` local trainings from the common initialisation, never
    aggregated: the federated client code (:class:`~fedlora.client.ClientNode`) with no server."""
    from tqdm.auto import tqdm

    rounds = exp.config.train.rounds
    nodes = [exp.client_node(d) for d in exp.clients]
    with tqdm(total=len(nodes) * rounds, desc="local training", unit="round", disable=not progress,
              dynamic_ncols=True) as bar:
        for node in nodes:
            for r in range(1, rounds + 1):
                node.fit(r)
                bar.update(1)
    return [dict(node.state) for node in nodes]


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _layer_mean(mats: Sequence[Tensor]) -> np.ndarray:
    return np.nanmean(np.stack([m.numpy() for m in mats]), axis=0)


def heatmap(sims: Sequence[LayerSimilarity], path: Path, kind: str, title: str) -> None:
    """clients × clients similarity averaged over layers: A side beside B side, learned above change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedlora.registry import ADAPTERS

    a_name, b_name = ADAPTERS.lookup(kind).side_names
    panels = [[("a", f"{a_name} learned"), ("b", f"{b_name} learned")],
              [("a_change", f"{a_name} − initial"), ("b_change", f"{b_name} − initial")]]
    n = sims[0].a.shape[0]
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 8.6), squeeze=False)
    image = None
    for i, row in enumerate(panels):
        for j, (attr, label) in enumerate(row):
            m = _layer_mean([getattr(s, attr) for s in sims])
            ax = axes[i][j]
            image = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_title(f"{label}\nmean pairwise similarity {mean_pairwise(torch.from_numpy(m)):.3f}", fontsize=10)
            ticks = range(n)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_yticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("client")
            ax.set_ylabel("client")
            if n <= 12:
                for u in range(n):
                    for v in range(n):
                        if not math.isnan(m[u, v]):
                            ax.text(v, u, f"{m[u, v]:.2f}", ha="center", va="center", fontsize=9 if n <= 6 else 7,
                                    color="white" if abs(m[u, v]) > 0.6 else "black")
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def asymmetry(config: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train every client locally from one initialisation, compare A and B across clients, write the files.

    The method is irrelevant without aggregation, except that it may freeze a side (FFA-LoRA freezes A); the
    analysis therefore trains with ``fedit``'s rules (everything trainable). Returns the summary (asymmetry.json).
    """
    import time

    from fedlora.experiment import build

    if isinstance(config.adapter.rank, tuple):
        raise ConfigError(f"adapter.rank = {list(config.adapter.rank)}: the asymmetry analysis compares A and B "
                          "across clients, which needs one shape for all; give one integer rank")
    check_output_dir(Path(out), "--out")  # before the model is loaded and trained
    start = time.perf_counter()
    config = replace(config, method=replace(config.method, name="fedit", share_head=None))
    exp = build(config)
    states = train_locally(exp, progress)
    sims = layer_similarities(states, exp.init_state)
    rows = [s.row() for s in sims]
    c = exp.config
    means = {k: float(np.nanmean([r[k] for r in rows])) for k in CSV_COLUMNS[1:9]}
    summary = {"model": c.model.name, "adapter": c.adapter.kind, "dataset": c.data.dataset,
               "partition": c.data.partition, "alpha": c.data.alpha, "num_clients": len(exp.clients),
               "seed": c.data.seed, "local_steps_per_client": c.train.rounds * c.train.local_steps,
               "layers": len(rows), **means, "wall_seconds": time.perf_counter() - start,
               "compared": "cosine similarity of the learned tensors (as in the FedSA-LoRA paper) and of their "
                           "change from the shared initialisation; mean over client pairs, then over layers"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "asymmetry.csv", _csv(rows))
    atomic_write(out / "asymmetry.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(out / "config.toml", dumps(c))
    title = (f"{c.adapter.kind} on {c.model.name}, {c.data.dataset} ({c.data.partition}"
             + (f" α={c.data.alpha}" if c.data.partition == "dirichlet" else "")
             + f"), {len(exp.clients)} clients, {c.train.rounds}×{c.train.local_steps} local steps, no aggregation;"
             f"\ncosine similarity across clients, averaged over {len(rows)} adapted layers")
    heatmap(sims, out / "asymmetry.png", c.adapter.kind, title)
    return summary
