"""The ServerApp ends when the ``fedlora`` launcher that started it is gone.

``fedlora run --runtime flower`` starts a SuperLink, which starts Flower's SuperExec, which starts ``flwr-serverapp``
(the process that runs fedlora's ServerApp). The launcher's own children die with it (a parent-death signal), and
Flower's children watch their parent's PID, but a parent-death setting is not inherited across ``fork``, and when
the launcher is killed (SIGKILL: no cleanup) the ServerApp's own exit handlers can wait on the SuperLink that is
already gone: the process was seen alive an hour later, re-parented to PID 1. So the launcher passes its PID and
start time in the run config (``launcher-pid``, ``launcher-start``), and the ServerApp runs a daemon thread that
ends its process once that launcher is gone. The run directory keeps its last checkpoint: ``fedlora run --resume``
continues it. A ServerApp started by ``flwr run`` without these keys (a user's own deployment) is not watched.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Mapping

EXIT_CODE = 3  # the ServerApp's exit status when its launcher is gone


def process_start(pid: int) -> str | None:
    """A token of the process ``pid``'s identity: its start time in clock ticks since boot (``/proc/PID/stat``,
    field 22), so a PID reused by another process does not pass for it; None when no such process runs. Without
    ``/proc`` (not Linux): "alive" while ``kill(pid, 0)`` succeeds."""
    try:
        fields = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has exited
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, IndexError):
        return None
    try:  # pragma: no cover - without /proc
        os.kill(pid, 0)
        return "alive"
    except ProcessLookupError:  # pragma: no cover
        return None
    except PermissionError:  # pragma: no cover - it exists, owned by another user
        return "alive"


def owner_config() -> dict[str, Any]:
    """What the launcher puts in the run config: itself."""
    return {"launcher-pid": os.getpid(), "launcher-start": process_start(os.getpid()) or ""}


def watch_owner(run_config: Mapping[str, Any], poll: float = 1.0,
                on_gone: Callable[[], None] | None = None) -> threading.Thread | None:
    """Start the daemon thread that ends this process (``os._exit(EXIT_CODE)``, or ``on_gone()``) once the launcher
    named in ``run_config`` no longer runs; None (nothing watched) when the run config names no launcher."""
    pid = int(run_config.get("launcher-pid", 0) or 0)
    start = str(run_config.get("launcher-start", ""))
    if pid <= 0:
        return None

    def gone() -> None:  # pragma: no cover - the process ends here (tested in a subprocess)
        print(f"fedlora: the launcher (PID {pid}) is gone; the ServerApp stops (fedlora run --resume continues the "
              "run from its last checkpoint)", flush=True)
        os._exit(EXIT_CODE)

    def watch() -> None:
        while True:
            now = process_start(pid)
            if now is None or (start and now != start):
                break
            time.sleep(poll)
        (on_gone or gone)()

    thread = threading.Thread(target=watch, name="fedlora-launcher-watch", daemon=True)
    thread.start()
    return thread
