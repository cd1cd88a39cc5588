"""Superseded by benchmarks/replication.py (issue 17), which writes docs/results.md.

The first edition (issue 6) judged the claims on means over three seeds, at a budget where the global models did not
learn rotten-tomatoes, with the classification head's protocol confounded with the method and learning rates chosen
on the clients' test splits; issue 17 lists why its verdicts did not measure what they said. Its per-run budget is
kept here because benchmarks/demo_aggregation.py measures every method at it.

    .venv/bin/python benchmarks/replication.py --workers 2    # the replication now
"""

from __future__ import annotations

import sys

# The first edition's per-run budget (read by benchmarks/demo_aggregation.py): 5 rounds × 4 steps × 8 examples.
BUDGET = ("model.name=minilm", "data.max_examples=700", "data.test_fraction=0.15", "data.alpha=0.5",
          "train.rounds=5", "train.local_steps=4", "train.batch_size=8", "train.max_length=48", "train.eval_every=2",
          "adapter.rank=8", "adapter.alpha=16")

if __name__ == "__main__":
    print("benchmarks/paper_claims.py is superseded: run benchmarks/replication.py (see its --help)", file=sys.stderr)
    sys.exit(2)
