"""Many clients (issue 26, part 4): client states on disk (train.client_states) give the run that memory gives, bit
for bit, through a kill and a resume; the store keeps the state a checkpoint refers to; a sampled subset of clients
is evaluated (train.eval_clients) and listed in the record."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora import config
from fedlora.errors import ConfigError
from fedlora.report import RunDir
from fedlora.runtime import simulation
from fedlora.runtime.client_store import ClientStateMissing, ClientStore

from conftest import RESUMABLE, assert_same_run, interrupted_and_resumed, tiny_config

PARTIAL = ("data.num_clients=6", "train.clients_per_round=2")


@pytest.mark.parametrize("method", ["fedsa", "feddpa"])  # FedSA's private B and head; FedDPA's local adapter
def test_states_on_disk_give_the_run_in_memory_bit_for_bit(tmp_path, method: str) -> None:
    runs = {}
    for mode in ("memory", "disk"):
        runs[mode] = tmp_path / mode
        simulation.run(tiny_config(*PARTIAL, f"method.name={method}", f"train.client_states={mode}"),
                       RunDir(runs[mode]), progress=False)
    assert_same_run(runs["memory"], runs["disk"])
    stored = sorted(p.name for p in (runs["disk"] / "checkpoint" / "clients").iterdir())
    assert stored == [f"{c}.safetensors" for c in range(6)]  # every client was evaluated, so each has a file
    assert not (runs["memory"] / "checkpoint" / "clients").exists()


def test_auto_keeps_states_on_disk_only_with_partial_participation() -> None:
    assert tiny_config(*PARTIAL).states_on_disk
    assert not tiny_config().states_on_disk  # every client in every round
    assert not tiny_config(*PARTIAL, "train.client_states=memory").states_on_disk


@pytest.mark.parametrize("at", ["fit:3", "checkpoint-write:2"])  # mid-round; after a round, before its checkpoint
def test_killed_and_resumed_run_with_states_on_disk_is_the_uninterrupted_one(tmp_path, monkeypatch, at) -> None:
    cfg = config.load(None, [*RESUMABLE, *PARTIAL, "train.client_states=disk"])
    straight = tmp_path / "straight"
    simulation.run(cfg, RunDir(straight), progress=False)
    assert_same_run(straight, interrupted_and_resumed(cfg, tmp_path / "resumed", monkeypatch, at))


def test_store_reads_back_bit_for_bit_and_keeps_the_checkpointed_epoch(tmp_path) -> None:
    store = ClientStore(tmp_path)
    g = torch.Generator().manual_seed(0)
    first = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(2, generator=g).to(torch.bfloat16)}
    second = {k: v + 1 for k, v in first.items()}
    third = {k: v + 2 for k, v in first.items()}
    store.write(7, first, version=1, stamp=1)
    store.write(7, second, version=2, stamp=2)  # a later epoch: epoch 1's state is kept
    store.write(7, third, version=3, stamp=2)  # the same epoch: only the current state is replaced
    for stamp, want, version in ((1, first, 1), (2, third, 3)):
        state, v = store.read(7, stamp)
        assert v == version and state.keys() == want.keys()
        assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in want)
    with pytest.raises(ClientStateMissing, match=r"holds the states of epochs \[2, 1\], not epoch 0"):
        store.read(7, 0)
    resumed = ClientStore(tmp_path)  # a resume at a checkpoint that refers to epoch 1
    resumed.restore({7: 1})
    assert torch.equal(resumed.read(7)[0]["a"], first["a"])
    with pytest.raises(ClientStateMissing, match=r"holds the states of epochs \[2, 1\], not epoch 0 that the "
                                                 r"checkpoint refers to"):
        ClientStore(tmp_path).restore({7: 0})
    store.path(7).write_bytes(store.path(7).read_bytes()[:-3])
    with pytest.raises(ClientStateMissing, match=r"client 7's state file .* is damaged"):
        store.read(7)
    with pytest.raises(ClientStateMissing, match=r"1 client state file\(s\) the checkpoint refers to are missing"):
        ClientStore(tmp_path / "other").restore({3: 1})


def test_a_sampled_subset_of_clients_is_evaluated_and_recorded(tmp_path) -> None:
    cfg = tiny_config(*PARTIAL, "train.eval_clients=3", "train.eval_every=2", "train.rounds=2")
    simulation.run(cfg, RunDir(tmp_path / "run"), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["evaluated"] is None and records[1]["clients"] is None  # round 1 is not evaluated
    for r in (records[0], records[2]):
        assert len(r["evaluated"]) == 3 and r["evaluated"] == sorted(set(r["evaluated"]))
        assert sorted(map(int, r["clients"])) == r["evaluated"]
    assert records[0]["evaluated"] != records[2]["evaluated"]  # drawn per round (this seed's draws differ)
    with pytest.raises(ConfigError, match=r"train.eval_clients = 7 exceeds data.num_clients = 6; use 0 \(all\) to 6"):
        tiny_config(*PARTIAL, "train.eval_clients=7")


def test_a_checkpoint_holding_the_states_resumes_with_states_on_disk(tmp_path, monkeypatch) -> None:
    # A checkpoint written with the states in it (train.client_states = memory, or a run of an older fedlora)
    cfg = config.load(None, [*RESUMABLE, *PARTIAL, "train.client_states=memory"])
    straight = tmp_path / "straight"
    simulation.run(cfg, RunDir(straight), progress=False)
    from conftest import Stop
    from fedlora.runtime import observers

    def stop(self, point: str, round_: int) -> None:
        if self.target == f"{point}:{round_}":
            raise Stop(self.target)

    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(observers.KillSwitch, "event", stop)
        m.setenv("FEDLORA_TEST_KILL_AT", "fit:3")
        with pytest.raises(Stop):
            simulation.run(cfg, RunDir(out), progress=False)
    disk = config.load(None, [*RESUMABLE, *PARTIAL, "train.client_states=disk"])
    simulation.run(disk, RunDir(out, resume=True), progress=False, resume=True)
    assert_same_run(straight, out)
