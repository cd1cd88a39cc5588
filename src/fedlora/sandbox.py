"""Run a generated Python program in a sandboxed subprocess: never in the evaluating process itself.

HumanEval scores a model by executing its completions against unit tests. The completions are untrusted text,
so each program runs in its own short-lived process with these layers (each one documented, none silent):

1. **A separate process** (``python -I -B``: isolated mode, no user site, no ``PYTHON*`` variables, no
   bytecode written) in a fresh **temporary directory** that is its working directory, ``HOME`` and ``TMPDIR``,
   with a minimal environment; the directory is deleted afterwards. Its output goes to files beside that
   directory, bounded by the file-size limit, not into this process's memory.
2. **Resource limits** (``setrlimit`` by the child on itself before it reads the program): CPU seconds,
   address space (memory), the size of any file it writes, open files, no core dumps; and a **wall-clock
   timeout** after which the whole process group (it runs in a new session) is killed with SIGKILL.
3. **No network.** When ``unshare --net --map-root-user`` works on this machine (Linux with user namespaces;
   probed once per process) the program runs in a new, empty network namespace: no interface but a down
   loopback, so no connection can be made anywhere, even by code that slips past the guard below. Where
   namespaces are unavailable only that guard (which refuses every socket) stands between the program and the
   network; ``isolation()`` says which applies.
4. **An in-process guard** (a PEP 578 audit hook installed before the program starts; hooks cannot be removed):
   it refuses creating sockets, starting processes (``fork``, ``exec``, ``spawn``, ``system``, ``subprocess``),
   signalling other processes, looking up a foreign function with ``ctypes`` (so none can be called), and any
   file write, rename, removal, ``chmod`` or directory creation outside the temporary directory.

A program *passes* when it exits with status 0 **and** prints a per-run random token after its last statement,
so a program that calls ``sys.exit(0)`` or ``os._exit(0)`` before the tests ran does not pass.

What this is not: a security boundary against code written to escape (the audit hook is Python-level; the
namespace covers the network only). It contains what evaluating model completions meets — infinite loops,
memory blow-ups, stray file writes, network calls, forks — and counts them as failures. For adversarial code,
run the evaluation inside a container or VM.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fedlora.errors import FedloraError

__all__ = ["DEFAULT_LIMITS", "Limits", "Outcome", "SandboxError", "isolation", "run_program"]

_DETAIL_CHARS = 300  # at most this much of the last line of stderr is kept with an outcome


class SandboxError(FedloraError):
    """The sandbox itself could not run (not a failing program: that is an :class:`Outcome`)."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. The defaults fit HumanEval: its tests finish in well under a second."""

    timeout_s: float = 5.0  # wall clock; the CPU limit is this rounded up plus one second
    memory_mb: int = 1024  # address space (RLIMIT_AS); Python itself needs about 30 MiB
    file_mb: int = 16  # largest file the program may write (inside its temporary directory)
    open_files: int = 64


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Outcome:
    """What happened to one program: ``passed``, ``failed`` (an exception or a non-zero exit: includes
    refused operations and memory errors), ``timeout``, or ``no-token`` (exited 0 before the end)."""

    status: str
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The program the child runs: install the guard, then execute the untrusted file, then print the token.
# It reads the file and the token before the guard exists; the token leaves the environment first.
_RUNNER = r'''
import os, resource, sys
_path = sys.argv[1]
for _which, _value in zip((resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE,
                           resource.RLIMIT_CORE), map(int, sys.argv[2:7])):
    resource.setrlimit(_which, (_value, _value))
_token = os.environ.pop("FEDLORA_SANDBOX_TOKEN")
_root = os.path.realpath(os.getcwd())
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), "<completion>", "exec")
_DENY = frozenset(("socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "pty.spawn", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
    "webbrowser.open", "urllib.Request"))
_PATHS = frozenset(("os.remove", "os.rename", "os.rmdir", "os.truncate", "os.chmod", "os.chown", "os.link",
    "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chdir"))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _inside(p):
    if isinstance(p, int):
        return True
    try:
        p = os.fsdecode(p)
    except TypeError:
        return False
    full = os.path.realpath(os.path.join(_root, p))
    return full == _root or full.startswith(_root + os.sep)
def _guard(event, args):
    if event in _DENY:
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        if writes and not _inside(path):
            raise PermissionError("sandbox: writing outside the sandbox directory is not allowed")
    elif event in _PATHS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError("sandbox: " + event + " outside the sandbox directory is not allowed")
sys.addaudithook(_guard)
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
sys.stdout.flush()
print(_token, flush=True)
'''


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give a new network namespace, if this machine allows one (probed once)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    for args in ((exe, "--net", "--map-root-user"), (exe, "--net")):
        try:
            if subprocess.run([*args, "true"], capture_output=True, timeout=10, check=False).returncode == 0:
                return args
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def isolation() -> str:
    """How the network is refused here: ``"namespace"`` (unshare) or ``"guard"`` (the audit hook only)."""
    return "namespace" if _unshare_prefix() else "guard"


def _limit_args(limits: Limits) -> list[str]:
    """The runner's resource limits (CPU s, address space, file size, open files, core size), which it sets on
    itself before reading the program: no ``preexec_fn``, so programs may be run from several threads."""
    return [str(v) for v in (int(limits.timeout_s) + 1, limits.memory_mb * 2**20, limits.file_mb * 2**20,
                             limits.open_files, 0)]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: this reaches anything it started
    except (ProcessLookupError, PermissionError):
        pass


def _tail(f: BinaryIO, size: int = 4096) -> bytes:
    """The last ``size`` bytes of an output file (the token, or the end of a traceback)."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - size))
    return f.read()


def run_program(program: str, limits: Limits = DEFAULT_LIMITS) -> Outcome:
    """Execute ``program`` (Python source) in the sandbox described in the module docstring."""
    if not sys.platform.startswith("linux") and sys.platform != "darwin":
        raise SandboxError(f"the code sandbox needs a POSIX system (resource limits, sessions); this is {sys.platform}")
    token = secrets.token_hex(16)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedlora-sandbox-") as tmp:
        # The program's directory is work/; its output goes to files beside it (outside its reach), where the
        # file-size limit also bounds a program that prints forever.
        work = Path(tmp) / "work"
        work.mkdir()
        path = work / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "FEDLORA_SANDBOX_TOKEN": token, "PYTHONHASHSEED": "0"}
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-B", "-c", _RUNNER, str(path), *_limit_args(limits)]
        with open(Path(tmp) / "stdout", "w+b") as out_f, open(Path(tmp) / "stderr", "w+b") as err_f:
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out_f,
                                        stderr=err_f, start_new_session=True)
            except OSError as e:
                raise SandboxError(f"cannot start the sandboxed interpreter {sys.executable!r}: {e}") from None
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                return Outcome("timeout", f"killed after {limits.timeout_s:g} s", time.perf_counter() - start)
            finally:
                _kill_group(proc)  # anything the program left running in its session
            out, err = _tail(out_f), _tail(err_f)
    seconds = time.perf_counter() - start
    # The last line of stderr: the exception of a traceback ("AssertionError", "PermissionError: sandbox: ...").
    detail = (err.decode("utf-8", "replace").strip().splitlines() or [""])[-1][-_DETAIL_CHARS:]
    if proc.returncode != 0:
        if proc.returncode == -signal.SIGXCPU:
            return Outcome("timeout", "CPU time limit", seconds)
        if proc.returncode == -signal.SIGXFSZ:
            return Outcome("failed", f"file size limit ({limits.file_mb} MiB; output included)", seconds)
        return Outcome("failed", detail or f"exit status {proc.returncode}", seconds)
    lines = out.decode("utf-8", "replace").strip().splitlines()
    if not lines or lines[-1].strip() != token:
        return Outcome("no-token", "exited before the end of the program", seconds)
    return Outcome("passed", "", seconds)
