"""``flower-supernode`` with a shorter idle wait, for federations on one machine.

Flower 1.41's SuperNode sleeps 3 s after every pull from the SuperLink that finds no message, and polls for
the ClientApp's reply every 0.5 s (``flwr/supernode/start_client_internal.py``). A fedlora round has two
message phases (train, then evaluate after aggregation), so each SuperNode idles up to 2 × 3 s per round
while the loop waits: on a short round this, not the messages, dominates Flower's overhead (see
docs/flower.md, "Figures"). This entry point runs Flower's own SuperNode with those waits capped at
``FEDLORA_SUPERNODE_POLL`` seconds (default 0.2). Everything else is Flower's: arguments, protocol, state.

It costs a pull per node every 0.2 s when idle, which is nothing on loopback; keep Flower's default against a
remote SuperLink shared by many nodes.

    python -m fedlora.runtime.flower_supernode --insecure --superlink 127.0.0.1:9092 ...   # = flower-supernode
"""

from __future__ import annotations

import os
import sys
import time
import types


def _capped_time(limit: float) -> types.SimpleNamespace:
    """The ``time`` module as seen by one Flower module, with ``sleep`` capped at ``limit`` seconds."""
    real_sleep = time.sleep
    attrs = {name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    attrs["sleep"] = lambda seconds: real_sleep(min(seconds, limit))
    return types.SimpleNamespace(**attrs)


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    # Only this module's waits (the idle pull and the reply poll), not time.sleep process-wide.
    start_client_internal.time = _capped_time(float(os.environ.get("FEDLORA_SUPERNODE_POLL", "0.2")))  # type: ignore
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
