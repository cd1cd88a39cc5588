"""CPU threads for server-side aggregation.

Aggregation is many small per-layer products and factorisations (d × N·r matrices, N·r ≤ a few hundred). With
several OpenMP threads, every one of those small operations ends at a barrier where the threads wait for each
other; when another process keeps the cores busy (a training run beside the server, another experiment), a
waiting thread spins on a core the working thread needs, and the barriers wait for threads that are not running.
Measured on the 2-core machine with a competing 2-thread process (``benchmarks/aggregation.py --contention``):
``flora_na`` at the 7B shape slowed 90× (0.86 s → 77 s, issue 15) with 2 threads, while with one thread it
costs about as much as the share of a core it gets. On an idle machine one thread is only somewhat slower for
these sizes, so the server aggregates with one thread by default (``AGGREGATION_THREADS``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

AGGREGATION_THREADS = 1


@contextlib.contextmanager
def limited_threads(n: int = AGGREGATION_THREADS) -> Iterator[None]:
    """Run the block with at most ``n`` torch intra-op threads; the previous number is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
