"""``runtime.kind = "flower"`` on one machine: a SuperLink and one SuperNode per client on 127.0.0.1.

:func:`run_local` starts the federation (free loopback ports, telemetry and the update check off, no runtime
dependency installation, a private ``FLWR_HOME``), submits the packaged app with ``flwr run --stream``,
checks the run's final status with ``flwr ls`` (``flwr run`` exits 0 even when the run failed) and stops
every process it started, in every case: success, failure, Ctrl-C, SIGTERM. Each process gets its own
process group, so stopping a SuperLink or SuperNode also stops the ServerApp / ClientApp processes it spawned.

With ``warm=True`` (the default) each SuperNode runs with ``--isolation process`` next to a
:mod:`fedlora.runtime.flower_node` executor that keeps the model loaded between messages; with ``warm=False``
Flower starts a fresh ClientApp process for every message (its default, much slower here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from fedlora import config as cfgmod
from fedlora.config import Config
from fedlora.errors import FedloraError
from fedlora.storage import LOCK_FILE
from fedlora.report import RunDir
from fedlora.runtime import flower_security as security
from fedlora.runtime.flower_owner import owner_config

if TYPE_CHECKING:
    from fedlora.privacy.certs import Credentials

CONNECTION = "fedlora-local"
RUN_ENV = "FEDLORA_FLOWER_RUN"
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       # HF_HUB_OFFLINE is the user's: a Hub model is resolved as the launcher's environment allows (inherited).
       "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FedloraError(f"{name} not found next to {sys.executable}: install Flower with "
                           "pip install 'fedlora[flower]' (flwr 1.41)")
    return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def node_config_arg(values: Mapping[str, Any]) -> str:
    """``--node-config`` text: space-separated key=value, strings quoted (Flower parses the values as TOML)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not Linux
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies, even by SIGKILL (prctl PR_SET_PDEATHSIG).
    Flower's own children watch their parent's PID, so no process outlives the launcher."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)


class Processes:
    """Started processes, each its own process group; :meth:`stop_all` ends every group (TERM, then KILL)."""

    def __init__(self, env: Mapping[str, str], cwd: Path, logs: Path) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopped: set[int] = set()

    def start(self, name: str, argv: list[str], group: int | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        try:
            # A group of its own (0) or an existing one, in this session (a group may not span sessions);
            # not the terminal's foreground group, so Ctrl-C reaches this process only, which stops the rest.
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=self.env, cwd=self.cwd, process_group=0 if group is None else group,
                                 preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.procs.append((name, p))
        return p

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def descendants(self) -> set[int]:
        """Every live process below the started ones (Flower starts some in sessions of their own)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                continue
        found: set[int] = set()
        todo = [p.pid for _, p in self.procs]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def stop_all(self, grace: float = 8.0) -> None:
        """End every started process group, then anything still alive below them; record the PIDs."""
        below = self.descendants()
        self.stopped = {p.pid for _, p in self.procs} | below
        groups = []
        for _, p in reversed(self.procs):
            try:
                pgid = os.getpgid(p.pid) if p.poll() is None else p.pid
                os.killpg(pgid, signal.SIGTERM)
                groups.append(pgid)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + grace
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pgid in groups:  # whatever is left of each group, children included
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in below:  # e.g. flower-superexec and the ServerApp, in a session of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for _, p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the federation runs, so that cleanup runs as for Ctrl-C."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _flwr(procs: Processes, args: list[str], timeout: float) -> str:
    res = subprocess.run([_bin("flwr"), *args], env=procs.env, cwd=procs.cwd, capture_output=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def run_status(procs: Processes, run_id: int, timeout: float = 120.0) -> dict[str, Any]:
    """The run's entry of ``flwr ls --format json`` (status, status-details, network-traffic, ...)."""
    text = _flwr(procs, ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout)
    try:
        runs = json.loads(text[text.index("{"):])["runs"]
    except (ValueError, KeyError) as e:
        raise FedloraError(f"cannot read the status of Flower run {run_id}: {e}: {text[-500:]}") from None
    return next((r for r in runs if str(r.get("run-id")) == str(run_id)), {"status": "unknown"})


def run_local(config: Config, out: RunDir, *, progress: bool = True, warm: bool = True,
              timeout: float | None = None, startup_timeout: float = 600.0,
              node_config: Mapping[int, Mapping[str, Any]] | None = None, poll: float = 0.2,
              simulation: bool = False, fast_poll: bool = True, resume: bool = False,
              credentials: Credentials | None = None) -> dict[str, Any]:
    """Run ``config`` through Flower on 127.0.0.1 and write ``out`` as the embedded runtime does.

    ``timeout`` bounds the whole run (seconds; None: no bound); ``node_config`` adds per-client node config
    (e.g. ``{1: {"fail-at": "train@2"}}``). Raises :class:`FedloraError` with Flower's error when the run fails.
    ``simulation=True`` uses Flower's simulation runtime instead (no SuperNodes: the SuperLink runs the
    ClientApps on Ray workers, which needs ``flwr[simulation]``; Ray binds non-loopback addresses, see
    docs/flower.md). ``fast_poll`` runs each SuperNode through :mod:`fedlora.runtime.flower_supernode`
    (Flower's SuperNode with its 3-s idle wait capped at 0.2 s: free on loopback, the main Flower overhead
    otherwise); ``fast_poll=False`` runs ``flower-supernode`` as is.

    ``resume=True`` continues the run in ``out`` after its last checkpointed round (``fedlora run --resume``): the
    ServerApp restores its checkpoint and every SuperNode reloads its client's state from its state folder
    (``out/flower/nodes/<k>``), under the federation id the first launch drew (``out/flower/federation.json``).
    """
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FedloraError("runtime.kind = 'flower' needs Flower: pip install 'fedlora[flower]' (flwr 1.41)") from None
    n = config.data.num_clients
    start = time.monotonic()
    overwrite = not resume and (out.overwrite or not (out.path.is_dir() and
                                                      any(e.name != LOCK_FILE for e in out.path.iterdir())))
    federation = _federation_id(out, resume)
    out.path.mkdir(parents=True, exist_ok=True)  # empty, or cleared by the ServerApp (overwrite)
    out.lock()  # this launcher holds the run directory's lock; its ServerApp writes there with lock=False
    home = Path(tempfile.mkdtemp(prefix="fedlora-flower-"))
    logs = home / "logs"
    logs.mkdir()
    # RUN_ENV names the run in every process of the federation, Flower's own children included (tests find them by it)
    env = {**os.environ, **ENV, "FLWR_HOME": str(home), RUN_ENV: str(out.path.resolve()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = Processes(env, home, logs)
    threads = config.train.threads or max(1, len(os.sched_getaffinity(0)) // n)  # nodes share this machine
    run_id: int | None = None
    try:
        with _terminate_as_interrupt():
            link_port = free_port()
            link = procs.start("superlink", [_bin("flower-superlink"), *security.link_args(credentials),
                                             "--disable-runtime-dependency-installation",
                                             "--host", "127.0.0.1", "--port", str(link_port)]
                               + (["--simulation"] if simulation else []))
            if not _wait_port(link_port, link, 90):
                raise FedloraError(f"the SuperLink did not start on 127.0.0.1:{link_port} ({_see(out, 'superlink')})")
            (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                              f'address = "127.0.0.1:{link_port}"\n' + security.connection_lines(credentials),
                                              encoding="utf-8")
            for argv in security.registrations(credentials, 0 if simulation else n, CONNECTION):
                reply = _flwr(procs, argv, timeout=120)  # SuperNode authentication: only registered keys connect
                if "registered successfully" not in reply:
                    raise FedloraError(f"flwr {' '.join(argv)} failed: {' '.join(reply.split())[-300:]}")
            out_abs = out.path.resolve()
            nodes = []
            for c in range(0 if simulation else n):
                port = free_port()
                values = {"partition-id": c, "num-partitions": n, "adapter-dir": str(out_abs / "clients" / str(c)),
                          "state-dir": str(out_abs / "flower" / "nodes" / str(c)), "threads": threads,
                          **dict((node_config or {}).get(c, {}))}
                supernode = [sys.executable, "-m", "fedlora.runtime.flower_supernode"] if fast_poll else \
                    [_bin("flower-supernode")]
                node = procs.start(f"supernode-{c}", [
                    *supernode, *security.node_args(credentials, c), "--superlink", f"127.0.0.1:{link_port}",
                    "--host", "127.0.0.1", "--port", str(port), "--isolation", "process" if warm else "subprocess",
                    "--max-wait-time", "60", "--node-config", node_config_arg(values)])
                nodes.append((c, port, node))
                if warm:  # in the SuperNode's process group: killing the node kills its executor too
                    procs.start(f"executor-{c}", [sys.executable, "-m", "fedlora.runtime.flower_node",
                                                  "--runtime-api-address", f"127.0.0.1:{port}", "--insecure",
                                                  "--parent-pid", str(node.pid)], group=node.pid)
            for c, port, node in nodes:  # each SuperNode serves its Runtime API once it is up
                if not _wait_port(port, node, 90):
                    raise FedloraError(f"the SuperNode of client {c} did not start ({_see(out, f'supernode-{c}')})")
            from fedlora.runtime.flower_app import APP_DIR

            run_config = home / "run_config.toml"
            run_config.write_text(
                "\n".join(f"{k} = {_toml_value(v)}" for k, v in {
                    "fedlora-config": cfgmod.dumps(config), "out-dir": str(out_abs), "overwrite": overwrite,
                    "resume": resume, "federation-id": federation,
                    "adapters-dir": str(out_abs / "clients"),
                    "startup-timeout": startup_timeout, "poll-interval": poll, **owner_config()}.items()) + "\n",
                encoding="utf-8")
            stream = procs.start("serverapp", [_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config",
                                               str(run_config), "--stream"]
                                 + (["--federation-config", f"num-supernodes={n} client-resources-num-cpus=1"]
                                    if simulation else []))
            run_id = _follow(procs, stream, link, out, config.train.rounds, start, timeout, progress)
            status = run_status(procs, run_id)
            (home / "status.json").write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
            if status.get("status") != "finished:completed":
                raise FedloraError(f"Flower run {run_id} ended as {status.get('status')}: "
                                   f"{' '.join(str(status.get('status-details')).split())} ({_see(out, 'serverapp')})")
            summary = json.loads((out.path / "summary.json").read_text(encoding="utf-8"))
            summary["flower_network_traffic"] = status.get("network-traffic")
            return summary
    except KeyboardInterrupt:
        if run_id is not None:
            try:
                _flwr(procs, ["stop", str(run_id), CONNECTION], timeout=20)
            except (subprocess.TimeoutExpired, OSError):
                pass
        raise
    finally:
        procs.stop_all()
        (logs / "processes.json").write_text(json.dumps(sorted(procs.stopped)) + "\n", encoding="utf-8")
        if out.path.is_dir():  # keep the processes' logs (and the run's status) with the run
            shutil.copytree(logs, out.path / "flower" / "logs", dirs_exist_ok=True)
            for name in ("status.json", "run_config.toml"):
                if (home / name).exists():
                    shutil.copy2(home / name, out.path / "flower" / name)
        shutil.rmtree(home, ignore_errors=True)


def _federation_id(out: RunDir, resume: bool) -> str:
    """A new random id for a new run; on resume, the id the run's ServerApp recorded (flower/federation.json)."""
    path = out.path / "flower" / "federation.json"
    if not resume:
        import uuid

        return uuid.uuid4().hex
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["federation_id"])
    except (OSError, ValueError, KeyError):
        raise FedloraError(f"--resume {str(out.path)!r}: no {str(path)!r}; the Flower run stopped before its "
                           "ServerApp started, so there is nothing to continue: start it again with --overwrite") \
            from None


def _see(out: RunDir, name: str) -> str:
    return f"log: {out.path / 'flower' / 'logs' / (name + '.log')}"


def _follow(procs: Processes, stream: subprocess.Popen[bytes], link: subprocess.Popen[bytes], out: RunDir,
            rounds: int, start: float, timeout: float | None, progress: bool) -> int:
    """Wait for the run submitted by ``flwr run --stream`` to end; return its id. Shows a progress bar from
    metrics.jsonl (written by the ServerApp as rounds complete)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=rounds, desc="flower", unit="round", disable=not progress, dynamic_ncols=True)
    run_id: int | None = None
    try:
        while stream.poll() is None:
            if timeout is not None and time.monotonic() - start > timeout:
                raise FedloraError(f"the Flower run did not finish within {timeout:g} s ({_see(out, 'serverapp')})")
            if link.poll() is not None:
                raise FedloraError(f"the SuperLink exited (code {link.returncode}; {_see(out, 'superlink')})")
            if run_id is None:
                run_id = _run_id(procs)
            metrics = out.path / "metrics.jsonl"
            if metrics.exists():
                done = sum(1 for line in metrics.read_text(encoding="utf-8").splitlines() if '"round": 0' not in line)
                bar.update(max(0, done - bar.n))
            time.sleep(0.5)
    finally:
        bar.close()
    run_id = run_id or _run_id(procs)
    if run_id is None:
        raise FedloraError(f"flwr run did not start a run ({_see(out, 'serverapp')})")
    return run_id


def _run_id(procs: Processes) -> int | None:
    found = re.search(r"Successfully started run (\d+)", procs.tail("serverapp", 400))
    return int(found.group(1)) if found else None
