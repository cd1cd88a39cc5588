"""The Flower runtime: same results as the embedded runtime, private state never in a message, dropouts
survived, a failed run is an error, every process stopped.

Flower (the `flower` extra, installed by the Makefile) is required: a missing package fails these tests, it
does not skip them. Each federation runs on 127.0.0.1 only, with a time bound; the launcher stops every
process it started and lists their PIDs in flower/logs/processes.json, which the tests check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flwr  # noqa: F401 - a missing Flower must fail here, loudly (pip install -e '.[flower]')
import pytest
import torch

from fedlora.protocol import BaseUpdate
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from conftest import tiny_config
from fedlora import config as cfgmod
from fedlora.adapters import role
from fedlora.errors import FedloraError
from fedlora.methods import Broadcast, Upload
from fedlora.report import RunDir
from fedlora.runtime import flower_codec as codec
from fedlora.runtime import simulation
from fedlora.runtime.flower_app import STATE, client_app, run_server
from fedlora.runtime.flower_launch import RUN_ENV, run_local
from fedlora.runtime.flower_owner import process_start, watch_owner

BOUND = 600  # seconds per federation: start-up dominates on a loaded 2-core machine


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def messages(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "flower" / "messages.jsonl").read_text().splitlines()]


def assert_all_stopped(run: Path) -> None:
    pids = json.loads((run / "flower" / "logs" / "processes.json").read_text())
    assert len(pids) >= 3  # SuperLink, SuperNodes, their executors, ...
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":  # a zombie is not running; PID 1 reaps re-parented ones when it does
            alive.append(pid)
    assert alive == []


def close(a: object, b: object, tol: float = 1e-6) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= tol
    return a == b


# ---- the message format (no processes) ----------------------------------------------------------------
@pytest.fixture
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Message() needs them


def test_broadcasts_round_trip_every_field_by_name(task_identity: None) -> None:
    a = Broadcast(payload={"x.lora_A.weight": torch.randn(4, 8)}, stats={"agg_error": 0.25}, version=3)
    base = BaseUpdate(dense={"w": torch.ones(2, 3)}, factored={"v": (torch.ones(4, 1), torch.full((1, 5), 2.0))})
    b = Broadcast(payload={}, base_update=base, reset_adapter=True, version=4)
    msg = Message(codec.request("train", 1, 2, [a, b]), dst_node_id=7, message_type="train")

    got = codec.get_broadcasts(msg.content)

    assert [g.version for g in got] == [3, 4]
    assert torch.equal(got[0].payload["x.lora_A.weight"], a.payload["x.lora_A.weight"])
    assert got[0].stats == {"agg_error": 0.25}
    assert got[1].reset_adapter and got[1].base_update.nbytes == (6 + 4 + 5) * 4
    assert torch.equal(got[1].base_update.dense["w"], torch.ones(2, 3))
    assert torch.equal(got[1].base_update.materialize()["v"], torch.full((4, 5), 2.0))
    assert codec.message_nbytes(msg) > 4 * 8 * 4 + 2 * 3 * 4  # every array travels, with framing


def test_an_upload_with_a_private_key_is_refused_before_sending() -> None:
    upload = Upload(0, {"x.lora_A.weight": torch.zeros(2, 2), "x.lora_B.weight": torch.zeros(2, 2)}, 5, {})
    with pytest.raises(FedloraError, match=r"refusing to send non-shared keys \['x.lora_B.weight'\]"):
        codec.upload_reply(upload, shared=["x.lora_A.weight"])


def test_an_upload_round_trips_with_what_the_server_validates() -> None:
    upload = Upload(2, {"x.lora_A.weight": torch.randn(3, 5)}, 17, {"train_loss": 0.5, "fingerprint": None})
    got = codec.read_upload(codec.upload_reply(upload, ["x.lora_A.weight"]), 2)
    assert (got.client, got.num_examples, dict(got.meta)) == (2, 17, {"train_loss": 0.5})
    assert got.payload["x.lora_A.weight"].dtype == torch.float32
    assert torch.equal(got.payload["x.lora_A.weight"], upload.payload["x.lora_A.weight"])
    with pytest.raises(FedloraError, match="answered as client 2"):
        codec.read_upload(codec.upload_reply(upload, ["x.lora_A.weight"]), 1)


# ---- the ServerApp and ClientApp in one process (no network) ------------------------------------------
class LoopbackGrid:
    """A Grid that hands each message to fedlora's ClientApp in this process, one Context per node, and keeps
    every message, so that tests can look inside them. A ClientApp exception becomes an error reply, as in
    Flower."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict) -> None:
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=nc, state=RecordDict(), run_config=run_config)
                         for nid, nc in node_configs.items()}
        self.replies: dict[str, Message] = {}
        self.seen: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.seen.append(m)
            try:
                reply = client_app(m, self.contexts[m.metadata.dst_node_id])
            except Exception as e:  # noqa: BLE001 - what Flower does with a ClientApp that raises
                reply = Message(Error(code=2, reason=str(e)), reply_to=m)
            self.seen.append(reply)
            self.replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def loopback_run(cfg, out: Path, node_extra: dict[int, dict] | None = None, grid_cls: type = LoopbackGrid,
                 **run_extra: object) -> LoopbackGrid:
    n = cfg.data.num_clients
    run_config = {"fedlora-config": cfgmod.dumps(cfg), "out-dir": str(out), "startup-timeout": 60, "poll-interval": 0.0,
                  **run_extra}
    grid = grid_cls({100 + c: {"partition-id": c, "num-partitions": n, "adapter-dir": str(out / "clients" / str(c)),
                               **(node_extra or {}).get(c, {})} for c in range(n)}, run_config)
    run_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid


@pytest.mark.parametrize("method,extra", [("fedsa", ()), ("fedit", ()), ("fedex", ()), ("flora", ("adapter.rank=[2,4]",)),
                                          ("flexlora", ("adapter.rank=[2,4]",))])
def test_serverapp_and_clientapp_give_the_embedded_results(tmp_path: Path, task_identity: None, method: str,
                                                           extra: tuple[str, ...]) -> None:
    cfg = tiny_config("data.num_clients=2", "train.rounds=2", f"method.name={method}", *extra)
    simulation.run(cfg, RunDir(tmp_path / "embedded"), progress=False)

    grid = loopback_run(cfg, tmp_path / "flower")

    a, b = records(tmp_path / "embedded"), records(tmp_path / "flower")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in b]
    for c in ("0", "1"):
        x = load_file(str(tmp_path / "embedded" / "clients" / c / "adapter_model.safetensors"))
        y = load_file(str(tmp_path / "flower" / "clients" / c / "adapter_model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert (tmp_path / "flower" / "global").is_dir() == (method != "fedsa")
    state = grid.contexts[100].state  # the node keeps its whole adapter, private side included ...
    assert {role(k) for k in state[STATE].keys()} == {"A", "B", "head"}


def test_fedsa_messages_hold_no_b_side_or_head_tensor(tmp_path: Path, task_identity: None) -> None:
    grid = loopback_run(tiny_config("data.num_clients=2", "train.rounds=2", "method.name=fedsa"), tmp_path / "run")

    keys = [k for m in grid.seen if m.has_content() for r in m.content.values() if isinstance(r, ArrayRecord)
            for k in r.keys()]
    assert len(grid.seen) > 10 and keys
    assert {role(k) for k in keys} == {"A"}  # ... and no message, either way, carries B or the head


def test_a_clientapp_that_raises_is_missing_from_that_round_only(tmp_path: Path, task_identity: None) -> None:
    cfg = tiny_config("data.num_clients=3", "train.rounds=2", "train.min_clients=2", "method.name=fedit")
    loopback_run(cfg, tmp_path / "run", {2: {"fail-at": "train@1"}})

    r = records(tmp_path / "run")
    assert r[1]["participants"] == [0, 1] and [m["client"] for m in r[1]["missing"]] == [2]
    assert "injected failure at train@1" in r[1]["missing"][0]["reason"]
    assert r[2]["participants"] == [0, 1, 2] and r[2]["missing"] == []


# ---- resume: the server's checkpoint, the nodes' state on disk ---------------------------------------------
class CrashingGrid(LoopbackGrid):
    """Stops the ServerApp (an exception, as if its process died) when it pushes the evaluation of round 2,
    after the nodes trained round 2; and with ``restart`` set, wipes that node's context.state (a SuperNode
    restarted) before its train message of round 2."""

    crash_at: tuple[str, int] | None = ("evaluate", 2)
    restart: int | None = None

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            at = (m.metadata.message_type, int(m.content[codec.HEADER]["round"]))
            if at == self.crash_at:
                raise RuntimeError("the ServerApp died")
            if self.restart == m.metadata.dst_node_id and at == ("train", 2):
                self.contexts[m.metadata.dst_node_id].state = RecordDict()
        return super().push_messages(messages)


def same_results(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ra] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rb]
    for c in ("0", "1"):
        x = load_file(str(a / "clients" / c / "adapter_model.safetensors"))
        y = load_file(str(b / "clients" / c / "adapter_model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("method", ["fedsa", "fedex"])
def test_a_resumed_federation_ends_as_the_uninterrupted_one(tmp_path: Path, task_identity: None, method: str) -> None:
    cfg = tiny_config("data.num_clients=2", "train.rounds=3", f"method.name={method}")
    loopback_run(cfg, tmp_path / "whole", **{"federation-id": "a"})
    with pytest.raises(RuntimeError, match="the ServerApp died"):
        loopback_run(cfg, tmp_path / "cut", grid_cls=CrashingGrid, **{"federation-id": "b"})
    assert [r["round"] for r in records(tmp_path / "cut")] == [0, 1]  # round 2 was trained, never recorded
    assert (tmp_path / "cut" / "clients" / "0.state" / "round-2.safetensors").is_file()
    # a new Flower run: new SuperNodes (empty context.state); the server resumes from its round-1 checkpoint and
    # every node rolls back from its round-2 file to its round-1 file
    loopback_run(cfg, tmp_path / "cut", resume=True, **{"federation-id": "b"})
    same_results(tmp_path / "whole", tmp_path / "cut")
    if method == "fedex":  # the base weights FedEx changed came back from the checkpoint and the node files
        x = load_file(str(tmp_path / "whole" / "clients" / "1" / "base_weights.safetensors"))
        y = load_file(str(tmp_path / "cut" / "clients" / "1" / "base_weights.safetensors"))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_restarted_supernode_reloads_its_private_state_from_disk(tmp_path: Path, task_identity: None) -> None:
    cfg = tiny_config("data.num_clients=2", "train.rounds=2", "method.name=fedsa")
    loopback_run(cfg, tmp_path / "whole", **{"federation-id": "a"})
    grid_cls = type("RestartingGrid", (CrashingGrid,), {"crash_at": None, "restart": 101})
    loopback_run(cfg, tmp_path / "restart", grid_cls=grid_cls, **{"federation-id": "a"})
    same_results(tmp_path / "whole", tmp_path / "restart")  # FedSA's private B and head were not lost


def test_node_state_files_are_of_one_federation_and_client_and_the_latest_not_after_the_round(tmp_path: Path) -> None:
    from fedlora.runtime.flower_state import load_snapshot, save_snapshot

    def state(x: float) -> dict[str, torch.Tensor]:
        return {"a": torch.full((2,), x)}

    for r in range(4):  # rounds 0..3 of client 1 in federation "f": the two latest stay
        save_snapshot(tmp_path, "f", 1, r, r + 10, state(r), {"w": torch.ones(1) * r})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-2.safetensors", "round-3.safetensors"]
    snap = load_snapshot(tmp_path, "f", 1, at_most=2)
    assert (snap.round, snap.version) == (2, 12) and torch.equal(snap.state["a"], state(2)["a"])
    assert torch.equal(snap.base["w"], torch.full((1,), 2.0))
    assert load_snapshot(tmp_path, "f", 1, at_most=1) is None  # nothing that early is kept
    assert load_snapshot(tmp_path, "other", 1, at_most=9) is None  # another federation's files are never used
    assert load_snapshot(tmp_path, "f", 0, at_most=9) is None  # nor another client's
    save_snapshot(tmp_path, "f", 1, 2, 99, state(-1), {})  # round 2 again (after a resume): round 3 is stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-2.safetensors"]
    assert load_snapshot(tmp_path, "f", 1, at_most=9).version == 99


# ---- federations on 127.0.0.1 -----------------------------------------------------------------------------
def test_flower_matches_the_embedded_runtime_and_keeps_fedsa_private_state_on_the_nodes(tmp_path: Path) -> None:
    cfg = tiny_config("data.num_clients=2", "train.rounds=2", "method.name=fedsa")
    simulation.run(cfg, RunDir(tmp_path / "embedded"), progress=False)

    summary = run_local(cfg, RunDir(tmp_path / "flower"), progress=False, timeout=BOUND)

    emb, flo = tmp_path / "embedded", tmp_path / "flower"
    a, b = records(emb), records(flo)
    assert [set(r) for r in a] == [set(r) for r in b]  # the same fields
    for ra, rb in zip(a, b):
        assert close({k: v for k, v in ra.items() if k != "seconds"}, {k: v for k, v in rb.items() if k != "seconds"})
    sa, sb = json.loads((emb / "summary.json").read_text()), json.loads((flo / "summary.json").read_text())
    assert set(sa) == set(sb)
    drop = ("wall_seconds", "flower_network_traffic")
    assert close({k: v for k, v in sa.items() if k not in drop}, {k: v for k, v in sb.items() if k not in drop})
    assert summary["flower_network_traffic"]["total-bytes"] > 0
    for c in ("0", "1"):
        x = load_file(str(emb / "clients" / c / "adapter_model.safetensors"))
        y = load_file(str(flo / "clients" / c / "adapter_model.safetensors"))
        assert x.keys() == y.keys()
        assert max(float((x[k] - y[k]).abs().max()) for k in x) <= 1e-6
    assert not (flo / "global").exists()  # FedSA has no global model, in both runtimes

    log = messages(flo)
    kinds = [(m["dir"], m["kind"]) for m in log]
    assert kinds.count(("up", "train")) == 4 and kinds.count(("up", "evaluate")) == 6  # 2 clients x 2 rounds, 3 evals
    keys = [k for m in log for names in m["arrays"].values() for k in names]
    assert keys and {role(k) for k in keys} == {"A"}  # never a B-side or head tensor, in either direction
    assert_all_stopped(flo)


def test_dropouts_crashed_clientapp_killed_supernode_and_a_failed_round(tmp_path: Path) -> None:
    # round 1: client 1's ClientApp raises -> 2 of 3 reply, the round counts;
    # round 2: client 1 raises again and client 2's SuperNode is killed -> 1 < min_clients, the round fails;
    # round 3: client 2 is gone, clients 0 and 1 reply -> the run completes.
    cfg = tiny_config("data.num_clients=3", "train.rounds=3", "train.min_clients=2", "method.name=fedit",
                      "train.round_timeout=45")
    run_local(cfg, RunDir(tmp_path / "run"), progress=False, timeout=BOUND,
              node_config={1: {"fail-at": "train@1,train@2"}, 2: {"kill-at": "train@2"}})

    r = records(tmp_path / "run")
    assert [x["round"] for x in r] == [0, 1, 2, 3]
    assert r[1]["participants"] == [0, 2] and r[1]["failed"] is None
    assert [m["client"] for m in r[1]["missing"]] == [1] and "injected failure" in r[1]["missing"][0]["reason"]
    assert r[2]["participants"] == [0] and "fewer than train.min_clients = 2" in r[2]["failed"]
    assert {m["client"] for m in r[2]["missing"]} == {1, 2}
    assert r[2]["bytes_down"] == 0  # no broadcast: the global state did not change
    assert r[3]["failed"] is None and r[3]["participants"] == [0, 1]
    assert 2 in {m["client"] for m in r[3]["missing"]} and r[3]["bytes_down"] > 0
    saved = json.loads((tmp_path / "run" / "flower" / "run.json").read_text())["adapters"]
    assert "error" in saved["2"] and (tmp_path / "run" / "clients" / "0" / "adapter_model.safetensors").is_file()
    assert_all_stopped(tmp_path / "run")


def _default_sigint() -> None:
    # A shell without job control starts background jobs (`cmd &`) with SIGINT ignored, and children inherit
    # that, so under such a CI runner Python would never turn SIGINT into KeyboardInterrupt. Give the CLI the
    # default disposition a user at a terminal has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fedlora(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", "--quiet", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)


TINY_CLI = ("--set", "runtime.kind=flower", "--set", "model.name=tiny-bert", "--set", "data.num_clients=2",
            "--set", "data.max_examples=240", "--set", "train.local_steps=2", "--set", "train.max_length=24",
            "--set", "train.threads=1", "--set", "adapter.rank=4")


def test_a_failed_flower_run_is_a_nonzero_exit_with_flowers_error(tmp_path: Path) -> None:
    proc = fedlora(*TINY_CLI, "--set", "data.dataset=csv", "--set", f"data.path={tmp_path / 'missing.csv'}",
                   "--set", "train.rounds=1", "--out", str(tmp_path / "run"), cwd=tmp_path)
    try:
        _, err = proc.communicate(timeout=BOUND)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert "ended as finished:failed" in err.decode() and "does not exist" in err.decode()
    assert not (tmp_path / "run" / "summary.json").exists()
    assert_all_stopped(tmp_path / "run")


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    proc = fedlora(*TINY_CLI, "--set", "train.rounds=100", "--out", str(tmp_path / "run"), cwd=tmp_path)
    try:
        end = time.monotonic() + BOUND
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < end and proc.poll() is None:
            time.sleep(1)  # the ServerApp is running: SuperLink, SuperNodes and executors are all up
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()[-2000:]
    assert_all_stopped(tmp_path / "run")


def _processes_naming(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``, or whose environment names it as their
    federation's run (RUN_ENV: Flower's own children, e.g. the ServerApp, whose command lines do not name it)."""
    found = []
    tag = f"{RUN_ENV}={text}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if text in (proc / "cmdline").read_bytes().decode(errors="replace") or \
                    tag in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


def test_the_serverapp_watch_ends_when_its_launcher_is_gone(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rc = {"launcher-pid": child.pid, "launcher-start": process_start(child.pid)}
        assert rc["launcher-start"] is not None and process_start(os.getpid()) is not None
        gone: list[float] = []
        thread = watch_owner(rc, poll=0.05, on_gone=lambda: gone.append(time.monotonic()))
        assert thread is not None
        time.sleep(0.3)
        assert gone == []  # the launcher still runs
        child.kill()
        child.wait()
        thread.join(10)
        assert len(gone) == 1 and process_start(child.pid) is None
    finally:
        child.kill()
    # a PID now held by another process than the one recorded (its start time differs) is gone too
    ended: list[int] = []
    watch_owner({"launcher-pid": os.getpid(), "launcher-start": "1"}, poll=0.05, on_gone=lambda: ended.append(1))
    deadline = time.monotonic() + 10
    while not ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended == [1]
    assert watch_owner({}) is None and watch_owner({"launcher-pid": 0}) is None  # `flwr run` by hand: not watched


# Both sides leave train.dtype = "auto" (TINY_CLI does not pin it), resolved alike through FEDLORA_AUTO_DTYPE in this
# process and the launched ones: float32 (the suite's default, tests/conftest.py) and bf16 (the path a machine with
# bf16 units takes; emulated, and still small, where it has none).
@pytest.mark.parametrize("auto", ["float32", "bfloat16"])
def test_a_launcher_killed_after_round_1_resumes_to_the_uninterrupted_result(tmp_path: Path, auto: str,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_AUTO_DTYPE", auto)
    cfg = tiny_config("data.num_clients=2", "train.rounds=3", "method.name=fedsa", "train.dtype=auto")
    simulation.run(cfg, RunDir(tmp_path / "embedded"), progress=False)
    run = tmp_path / "run"
    proc = fedlora(*TINY_CLI, "--set", "train.rounds=3", "--set", "method.name=fedsa", "--set", "train.batch_size=8",
                   "--out", str(run), cwd=tmp_path)  # = cfg
    try:
        end = time.monotonic() + BOUND
        while time.monotonic() < end and proc.poll() is None and not (
                (run / "checkpoint" / "state.safetensors").is_file() and len(records(run)) >= 2):
            time.sleep(0.5)  # round 1 is recorded and checkpointed
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        # Flower's ServerApp (started by the SuperLink's SuperExec) is found by its environment, not its command line
        assert any(b"flwr-serverapp" in Path(f"/proc/{p}/cmdline").read_bytes() for p in _processes_naming(str(run)))
        proc.kill()  # SIGKILL: no cleanup of any kind in the launcher
        proc.wait(timeout=30)
    finally:
        proc.kill()
    end = time.monotonic() + 120
    while _processes_naming(str(run)) and time.monotonic() < end:
        time.sleep(1)  # its children die with it (parent-death signal; Flower's own children watch their parent)
    assert _processes_naming(str(run)) == []
    assert not (run / "summary.json").exists()

    resumed = fedlora("--resume", str(run), cwd=tmp_path)
    try:
        _, err = resumed.communicate(timeout=BOUND)
    finally:
        resumed.kill()
    assert resumed.returncode == 0, err.decode()[-3000:]
    a, b = records(tmp_path / "embedded"), records(run)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for side in (tmp_path / "embedded", run):
        assert cfgmod.load(side / "config.toml").train.dtype == auto
    assert close([{k: v for k, v in r.items() if k != "seconds"} for r in a],
                 [{k: v for k, v in r.items() if k != "seconds"} for r in b])
    for c in ("0", "1"):
        x = load_file(str(tmp_path / "embedded" / "clients" / c / "adapter_model.safetensors"))
        y = load_file(str(run / "clients" / c / "adapter_model.safetensors"))
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=0, atol=1e-6) for k in x)
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["from_round"] >= 1
    assert_all_stopped(run)


# ---- Flower's simulation runtime (Ray), only inside a private network namespace -------------------------
RAY_PATH = os.environ.get("FEDLORA_TEST_RAY_PATH", "")  # a folder with ray 2.55.1 (pip install --target DIR ...)
HAS_RAY = bool(RAY_PATH) or importlib.util.find_spec("ray") is not None

RAY_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from fedlora.report import RunDir
from fedlora.runtime import simulation
from fedlora.runtime.flower_launch import RUN_ENV, run_local
from fedlora.runtime.flower_owner import process_start, watch_owner
cfg = tiny_config("data.num_clients=3", "train.rounds=2", "method.name=fedsa")
run_local(cfg, RunDir({out!r} + "/ray"), progress=False, timeout=600, simulation=True)
simulation.run(cfg, RunDir({out!r} + "/embedded"), progress=False)
"""


@pytest.mark.skipif(not HAS_RAY, reason="Flower's simulation runtime needs ray, which the Makefile does not install "
                                        "(pip install 'flwr[simulation]==1.41.0', or FEDLORA_TEST_RAY_PATH=<dir>)")
def test_simulation_runtime_inside_a_private_network_namespace(tmp_path: Path) -> None:
    # Ray binds non-loopback addresses: it runs only in a network namespace of its own, with loopback alone.
    script = tmp_path / "ray_run.py"
    script.write_text(RAY_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    if RAY_PATH:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (RAY_PATH, env.get("PYTHONPATH", "")) if p)
    res = subprocess.run(["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "{sys.executable}" "{script}"'],
                         env=env, capture_output=True, timeout=BOUND + 120)
    if res.returncode != 0 and b"unshare failed" in res.stderr:
        pytest.skip(f"unshare -n is not permitted here ({res.stderr.decode().strip()}); Ray must not run outside it")
    assert res.returncode == 0, res.stderr.decode()[-3000:]

    a, b = records(tmp_path / "embedded"), records(tmp_path / "ray")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in b]
    for c in ("0", "1", "2"):
        x = load_file(str(tmp_path / "embedded" / "clients" / c / "adapter_model.safetensors"))
        y = load_file(str(tmp_path / "ray" / "clients" / c / "adapter_model.safetensors"))
        assert max(float((x[k] - y[k]).abs().max()) for k in x) <= 1e-6
    assert_all_stopped(tmp_path / "ray")


def _write_csv(path: Path, labels: list[str], n: int, seed: int) -> None:
    import csv
    import random

    rng = random.Random(seed)
    words = {"good": ["great", "fine", "lovely", "superb"], "bad": ["awful", "dull", "poor", "boring"],
             "odd": ["strange", "weird", "curious", "quirky"]}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = labels[i % len(labels)]
            w.writerow([" ".join(rng.choice(words[label]) for _ in range(6)), label])


@pytest.mark.parametrize("method", ["fedsa", "flora"])
def test_nodes_with_their_own_data_files(tmp_path: Path, task_identity: None, method: str) -> None:
    server_file, files = tmp_path / "server.csv", [tmp_path / f"site{c}.csv" for c in range(2)]
    _write_csv(server_file, ["bad", "good"], 60, 0)
    for c, f in enumerate(files):
        _write_csv(f, ["bad", "good"], 40 + 10 * c, c + 1)
    # flora: per-client ranks, each node holding the one adapter of its own rank
    extra = ["adapter.rank=[2,4]"] if method == "flora" else []
    cfg = tiny_config("data.num_clients=2", "train.rounds=1", f"method.name={method}", "data.dataset=csv",
                      f"data.path={server_file}", "data.max_examples=0", *extra)

    loopback_run(cfg, tmp_path / "run", {c: {"data-file": str(f)} for c, f in enumerate(files)})

    r = records(tmp_path / "run")
    assert r[1]["participants"] == [0, 1] and r[1]["failed"] is None and not r[1]["rejected"]
    if method == "flora":
        assert r[1]["agg_error"] < 1e-5
        ranks = [json.loads((tmp_path / "run" / "clients" / str(c) / "adapter_config.json").read_text())["r"]
                 for c in range(2)]
        assert ranks == [2, 4]
    hello = [m for m in messages(tmp_path / "run") if m["kind"] == "query.hello"]
    assert len(hello) == 4  # every node answered


def test_a_node_whose_file_has_other_labels_is_refused_at_start_up(tmp_path: Path, task_identity: None) -> None:
    server_file, good, odd = tmp_path / "server.csv", tmp_path / "site0.csv", tmp_path / "site1.csv"
    _write_csv(server_file, ["bad", "good"], 60, 0)
    _write_csv(good, ["bad", "good"], 40, 1)
    _write_csv(odd, ["bad", "odd"], 40, 2)
    cfg = tiny_config("data.num_clients=2", "train.rounds=1", "method.name=fedsa", "data.dataset=csv",
                      f"data.path={server_file}", "data.max_examples=0", "train.min_clients=1")

    loopback_run(cfg, tmp_path / "run", {0: {"data-file": str(good)}, 1: {"data-file": str(odd)}})

    errors = json.loads((tmp_path / "run" / "flower" / "run.json").read_text())["node_errors"]
    assert list(errors.values()) == ["client 1's data has labels ['bad', 'odd']; the federation's labels are "
                                     "['bad', 'good'] (every node's file must use the same label set)"]
    assert {m["client"] for m in records(tmp_path / "run")[1]["missing"]} == {1}  # from training and evaluation


def test_a_node_with_its_own_data_file_holds_out_validation_not_test(tmp_path: Path) -> None:
    """``data.validation_fraction`` on a node that reads its own file: its evaluation set is part of its training
    split (as in a partition, data/partition.py stage 5), never an example of its test split."""
    from fedlora.runtime.flower_client import _build_node

    f = tmp_path / "site.csv"
    _write_csv(f, ["bad", "good"], 80, 3)
    cfg = tiny_config("data.num_clients=2", "data.dataset=csv", f"data.path={f}", "data.max_examples=0")
    _, plain = _build_node(cfg, 1, str(f), "")
    _, tuned = _build_node(tiny_config("data.num_clients=2", "data.dataset=csv", f"data.path={f}",
                                       "data.max_examples=0", "data.validation_fraction=0.25"), 1, str(f), "")
    train, test = plain[1].train, plain[1].test
    val_train, val = tuned[1].train, tuned[1].test
    assert len(val) > 0 and len(val_train) > 0
    assert set(val) | set(val_train) == set(train) and not set(val) & set(val_train)
    assert not (set(val) | set(val_train)) & set(test)
