"""The statistics, verdicts and text of benchmarks/replication.py (docs/results.md), issue 17.

Every claimed inequality "X beats Y" is judged on the paired difference X_s − Y_s over seeds s (same data
subsample, partition, test splits and initialisation for every method of a seed), with a 95% Student-t interval:

- **holds** when the interval lies entirely on the claimed side of zero,
- **does not hold** when it lies entirely on the other side,
- **inconclusive** otherwise (or with fewer than two seeds),
- **did not learn** instead of any of these when, for an accuracy, one of the two methods does not beat the
  majority-class floor by MARGIN (mean over seeds): the comparison would then be between models that learned
  nothing but the label skew, and it is not made.

Nothing here runs a model: replication.py gathers the numbers (:class:`CellResult`) and calls :func:`document`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from scipy import stats as scipy_stats

# A method "learned" when its accuracy beats the majority-class floor by at least this much (mean over seeds).
MARGIN = 0.05
LEVEL = 0.95


# --------------------------------------------------------------------------------------------- the grid's shape

@dataclass(frozen=True)
class Variant:
    """One row of a table: a method under one protocol (head private or shared, weighting, centralized)."""

    key: str  # unique within a (dataset, optimizer)
    method: str
    label: str  # what the tables call it
    adapter: str = "lora"
    share_head: bool | None = None  # None: the method's default
    weighting: str = "samples"
    central: bool = False  # one client holding the pooled training data, the same examples seen
    tune_as: str | None = None  # reuse the tuned learning rate of this variant (same method, other protocol)
    reference: bool = False  # a reference row (local, centralized), not a federated method


@dataclass(frozen=True)
class Claim:
    """One claimed inequality: ``left`` beats ``right`` on ``metric`` (``higher`` better or lower)."""

    number: str
    left: str  # variant keys
    right: str
    metric: str  # "personal", "global", "agg_error", "agg_error_r1", "acc_per_mib"
    higher: bool = True


@dataclass(frozen=True)
class Block:
    """A part of the grid: datasets × one optimizer × variants, with the claims it tests. ``borrow`` names variants
    of other blocks (same dataset and optimizer) that its claims and table use."""

    name: str
    title: str
    datasets: tuple[str, ...]
    optimizer: str
    variants: tuple[Variant, ...]
    claims: tuple[Claim, ...] = ()
    borrow: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ measured numbers

@dataclass
class RunNumbers:
    """The per-run values the verdicts and tables read."""

    personal: float | None
    global_: float | None
    bytes_total: int
    agg_error: float | None  # mean over trained rounds
    agg_error_r1: float | None
    curve: list[tuple[int, float]]  # (round, personalized accuracy) at every evaluated round
    wall: float

    @property
    def acc_per_mib(self) -> float | None:
        if self.personal is None or self.bytes_total <= 0:
            return None
        return self.personal / (self.bytes_total / 2**20)


@dataclass
class CellResult:
    """One (dataset, optimizer, variant) of the main grid: its learning rate and its runs by seed."""

    dataset: str
    optimizer: str
    variant: Variant
    lr: float | None
    runs: dict[int, RunNumbers] = field(default_factory=dict)

    def values(self, metric: str) -> dict[int, float]:
        out = {}
        for seed, r in self.runs.items():
            v = r.global_ if metric == "global" else getattr(r, metric)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out[seed] = float(v)
        return out


@dataclass(frozen=True)
class Floors:
    """Majority-class floors of one (dataset, seed): mean over clients of the accuracy of predicting each client's
    training majority on its test split, and the pooled training majority on the global test set."""

    personal: float
    global_: float
    clients: tuple[float, ...]
    test_sizes: tuple[int, ...]


@dataclass(frozen=True)
class Paired:
    n: int
    left: float
    right: float
    diff: float
    lo: float
    hi: float


def paired(left: Mapping[int, float], right: Mapping[int, float]) -> Paired | None:
    """Mean paired difference left − right over the seeds both have, with a 95% t interval (NaN below 2 seeds)."""
    seeds = sorted(left.keys() & right.keys())
    if not seeds:
        return None
    d = [left[s] - right[s] for s in seeds]
    mean = statistics.fmean(d)
    if len(d) < 2:
        lo = hi = math.nan
    else:
        half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2, len(d) - 1)) * statistics.stdev(d) / math.sqrt(len(d))
        lo, hi = mean - half, mean + half
    return Paired(len(d), statistics.fmean(left[s] for s in seeds), statistics.fmean(right[s] for s in seeds),
                  mean, lo, hi)


def verdict(p: Paired | None, higher: bool = True) -> str:
    """holds / does not hold / inconclusive, from the interval of left − right (``higher``: left claimed larger)."""
    if p is None:
        return "not run"
    if p.n < 2 or math.isnan(p.lo):
        return "inconclusive"
    lo, hi = (p.lo, p.hi) if higher else (-p.hi, -p.lo)
    if lo > 0:
        return "holds"
    if hi < 0:
        return "does not hold"
    return "inconclusive"


def gain_over_floor(cell: CellResult, floors: Mapping[tuple[str, int], Floors], metric: str) -> float | None:
    """Mean over seeds of accuracy − majority floor (personal or global); None without runs or floors."""
    values = cell.values(metric)
    gains = [v - (floors[(cell.dataset, s)].personal if metric == "personal" else floors[(cell.dataset, s)].global_)
             for s, v in values.items() if (cell.dataset, s) in floors]
    return statistics.fmean(gains) if gains else None


def learned(cell: CellResult, floors: Mapping[tuple[str, int], Floors], metric: str) -> bool | None:
    if cell.variant.central and metric == "personal":
        metric = "global"  # its one client's test split is not the federated clients': judge it on the global set
    g = gain_over_floor(cell, floors, metric)
    return None if g is None else g >= MARGIN


# ---------------------------------------------------------------------------------------------- the verdicts

@dataclass
class Row:
    """One judged claim in one setting."""

    claim: Claim
    dataset: str
    optimizer: str
    left: CellResult | None
    right: CellResult | None
    result: Paired | None
    verdict: str


METRIC_NAMES = {"personal": "personalized accuracy", "global": "global accuracy",
                "agg_error": "aggregation error (mean over rounds)", "agg_error_r1": "aggregation error, round 1",
                "acc_per_mib": "personalized accuracy per MiB sent"}


def judge(blocks: Sequence[Block], cells: Mapping[tuple[str, str, str], CellResult],
          floors: Mapping[tuple[str, int], Floors]) -> list[Row]:
    rows = []
    for block in blocks:
        for dataset in block.datasets:
            for claim in block.claims:
                left = cells.get((dataset, block.optimizer, claim.left))
                right = cells.get((dataset, block.optimizer, claim.right))
                if left is None or right is None or not left.runs or not right.runs:
                    rows.append(Row(claim, dataset, block.optimizer, left, right, None, "not run"))
                    continue
                p = paired(left.values(claim.metric), right.values(claim.metric))
                v = verdict(p, claim.higher)
                if claim.metric in ("personal", "global", "acc_per_mib"):
                    acc = "personal" if claim.metric == "acc_per_mib" else claim.metric
                    dull = [c.variant.label for c in (left, right) if learned(c, floors, acc) is False]
                    if dull:
                        v = f"did not learn ({' and '.join(dull)})"
                rows.append(Row(claim, dataset, block.optimizer, left, right, p, v))
    return rows


@dataclass(frozen=True)
class Similarity:
    """Claim 2 on one local-only run: mean over client pairs and layers of the cosine similarity."""

    a: float
    b: float
    a_change: float
    b_change: float


def similarity_rows(sims: Mapping[tuple[str, str], Mapping[int, Similarity]]) -> list[tuple[str, str, str, Paired | None,
                                                                                            str]]:
    """(dataset, optimizer, what, paired A − B, verdict) for the learned tensors and their change from init."""
    out = []
    for (dataset, optimizer), by_seed in sims.items():
        for what, fa, fb in (("learned", "a", "b"), ("change from initialisation", "a_change", "b_change")):
            p = paired({s: getattr(v, fa) for s, v in by_seed.items()}, {s: getattr(v, fb) for s, v in by_seed.items()})
            out.append((dataset, optimizer, what, p, verdict(p)))
    return out


# ------------------------------------------------------------------------------------------------ formatting

def num(x: float, digits: int | None, sign: str = "") -> str:
    """``x`` with ``digits`` decimals, or 3 significant digits when ``digits`` is None (errors span decades)."""
    return f"{x:{sign}.{digits}f}" if digits is not None else f"{x:{sign}.3g}"


def pct(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def pm(values: Sequence[float], scale: float = 100.0, digits: int | None = 1) -> str:
    """Mean ± sample std (the std only with two values or more)."""
    if not values:
        return "—"
    m = statistics.fmean(values) * scale
    return num(m, digits) + (f" ± {num(statistics.stdev(values) * scale, digits)}" if len(values) > 1 else "")


def interval(p: Paired | None, scale: float = 100.0, digits: int | None = 1) -> str:
    if p is None:
        return "—"
    if math.isnan(p.lo):
        return f"{num(p.diff * scale, digits, '+')} (n={p.n})"
    return (f"{num(p.diff * scale, digits, '+')} [{num(p.lo * scale, digits, '+')}, {num(p.hi * scale, digits, '+')}] "
            f"(n={p.n})")


def _scale(metric: str) -> tuple[float, int | None]:
    if metric in ("personal", "global"):
        return 100.0, 1
    if metric == "acc_per_mib":
        return 100.0, 2
    return 1.0, None


def claim_table(rows: Sequence[Row], title: Callable[[str, str], str]) -> list[str]:
    out = ["| setting | claim | metric | left | right | left − right, 95% CI | verdict |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        scale, digits = _scale(r.claim.metric)
        sign = ">" if r.claim.higher else "<"
        lv = "—" if r.result is None else num(r.result.left * scale, digits)
        rv = "—" if r.result is None else num(r.result.right * scale, digits)
        names = [c.variant.label if c else k for c, k in ((r.left, r.claim.left), (r.right, r.claim.right))]
        out.append(f"| {title(r.dataset, r.optimizer)} | {names[0]} {sign} {names[1]} | {METRIC_NAMES[r.claim.metric]} | "
                   f"{lv} | {rv} | {interval(r.result, scale, digits)} | **{r.verdict}** |")
    return out


def cell_table(cells: Sequence[CellResult], floors: Mapping[tuple[str, int], Floors], seeds: Sequence[int]) -> list[str]:
    """One setting's table: the majority floor first, then every variant (references marked)."""
    if not cells:
        return []
    dataset = cells[0].dataset
    fl = [floors[(dataset, s)] for s in seeds if (dataset, s) in floors]
    out = ["| method | lr | seeds | personalized acc | − floor | global acc | learned | MiB sent | acc / MiB | "
           "agg error | time / run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    if fl:
        out.append(f"| *majority-class floor* (each client's training majority) | | {len(fl)} | "
                   f"{pm([f.personal for f in fl])} | | {pm([f.global_ for f in fl])} | | | | | |")
    for c in cells:
        runs = [c.runs[s] for s in sorted(c.runs)]
        personal = [r.personal for r in runs if r.personal is not None]
        glob = [r.global_ for r in runs if r.global_ is not None]
        gain = gain_over_floor(c, floors, "personal") if not c.variant.central else None
        above = None if c.variant.central else paired(  # the gain's 95% interval over seeds (shown, not a verdict)
            c.values("personal"), {s: f.personal for (d, s), f in floors.items() if d == dataset})
        ok = learned(c, floors, "personal")
        mib = statistics.fmean(r.bytes_total for r in runs) / 2**20 if runs else None
        per = [r.acc_per_mib for r in runs if r.acc_per_mib is not None]
        err = [r.agg_error for r in runs if r.agg_error is not None]
        wall = statistics.fmean(r.wall for r in runs) if runs else None
        name = f"*{c.variant.label}*" if c.variant.reference else c.variant.label
        out.append(f"| {name} | {'—' if c.lr is None else f'{c.lr:g}'} | {len(runs)} | {pm(personal)} | "
                   f"{'—' if gain is None else f'{100 * gain:+.1f}'}"
                   f"{'' if above is None or math.isnan(above.lo) else f' [{100 * above.lo:+.1f}, {100 * above.hi:+.1f}]'}"
                   f" | {pm(glob)} | "
                   f"{'—' if ok is None else ('yes' if ok else '**no**')} | "
                   f"{'—' if mib is None else f'{mib:.2f}'} | {pm(per, 100, 2)} | {pm(err, 1.0, None)} | "
                   f"{'—' if wall is None else f'{wall:.0f} s'} |")
    return out


def curve_table(cells: Sequence[CellResult], examples_per_round: int) -> list[str]:
    """Personalized accuracy (mean over seeds) at every evaluated round: the learning curves of the budget."""
    rounds = sorted({rnd for c in cells for r in c.runs.values() for rnd, _ in r.curve})
    if not rounds:
        return []
    out = ["| method | " + " | ".join(f"round {r} ({r * examples_per_round} ex.)" for r in rounds) + " |",
           "|---|" + "---|" * len(rounds)]
    for c in cells:
        row = []
        for rnd in rounds:
            vals = [v for r in c.runs.values() for k, v in r.curve if k == rnd]
            row.append(pct(statistics.fmean(vals)) if vals else "—")
        out.append(f"| {c.variant.label} | " + " | ".join(row) + " |")
    return out


def tally(rows: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        v = r if isinstance(r, str) else r.verdict
        key = "did not learn" if v.startswith("did not learn") else v
        counts[key] = counts.get(key, 0) + 1
    order = ["holds", "does not hold", "inconclusive", "did not learn", "not run"]
    return ", ".join(f"{k} {counts[k]}" for k in order if k in counts) or "nothing judged"


def asymmetry_table(rows: Sequence[tuple[str, str, str, Paired | None, str]],
                    sims: Mapping[tuple[str, str], Mapping[int, Similarity]], title: Callable[[str, str], str]
                    ) -> list[str]:
    out = ["| setting | tensors | A (mean over seeds) | B | A − B, 95% CI | verdict: A more similar |",
           "|---|---|---|---|---|---|"]
    for dataset, optimizer, what, p, v in rows:
        by_seed = sims[(dataset, optimizer)]
        fa, fb = ("a", "b") if what == "learned" else ("a_change", "b_change")
        a = [getattr(s, fa) for s in by_seed.values()]
        b = [getattr(s, fb) for s in by_seed.values()]
        out.append(f"| {title(dataset, optimizer)} | {what} | {pm(a, 1, 3)} | {pm(b, 1, 3)} | {interval(p, 1, 3)} | "
                   f"**{v}** |")
    return out
