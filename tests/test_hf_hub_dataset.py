"""``data.dataset = "hf"`` with a Hub dataset id (issue 25), the way a user with network access uses it: the first
run downloads the dataset through the datasets library, and later runs with HF_HUB_OFFLINE=1 load it from the cache
that download left. The Hub is a fake one on the loopback interface (a thread, http.server) serving a parquet
dataset repository in GLUE SST-2's layout; it answers only what datasets and huggingface_hub ask to load it (the
dataset's info at a revision, the tree listing of a folder, HEAD and GET of a file), and 404 to anything else. Every
connection the process opens is recorded: online they all go to the fake Hub, offline there are none."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import datasets
import huggingface_hub.constants
import numpy as np
import pytest

from conftest import TINY, comparable, tiny_config
from fedlora.cli import main

REPO = "acme/sst2-mini"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit the fake Hub's main points to
SIZES = {"train": 60, "validation": 20}
GOOD = ("a warm and funny film", "an inventive, moving story", "great acting and a clever plot")
BAD = ("a dull and tedious mess", "flat, lifeless and far too long", "a clumsy script and weak acting")


def _rows(split: str, n: int) -> dict[str, list]:
    labels = [(i * 7 + len(split)) % 3 % 2 for i in range(n)]  # both classes, not simply alternating
    return {"sentence": [f"{(GOOD if y else BAD)[i % 3]} ({split} {i})" for i, y in enumerate(labels)],
            "label": labels, "idx": list(range(n))}


def _parquet(split: str) -> bytes:
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    out = io.BytesIO()
    datasets.Dataset.from_dict(_rows(split, SIZES[split]), features=features).to_parquet(out)
    return out.getvalue()


class _FakeHub(BaseHTTPRequestHandler):
    """The Hub's answers for one dataset repository (``files``: its path -> bytes) at one commit."""

    protocol_version = "HTTP/1.1"
    files: dict[str, bytes] = {}
    requests: list[str] = []

    def _send(self, status: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any) -> None:
        self._send(200, json.dumps(obj).encode(), (("Content-Type", "application/json"),))

    def _entries(self) -> list[dict[str, Any]]:
        folders = {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        return ([{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(folders)]
                + [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                   for p, b in sorted(self.files.items())])

    def _answer(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        path = unquote(urlsplit(self.path).path)
        revision = f"(?:main|{COMMIT})"
        if m := re.fullmatch(f"/datasets/{REPO}/resolve/{revision}/(.+)", path):
            body = self.files.get(m.group(1))
            if body is None:
                return self._send(404, headers=(("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", COMMIT)))
            return self._send(200, body, (("X-Repo-Commit", COMMIT),
                                          ("ETag", f'"{hashlib.sha256(body).hexdigest()}"')))
        if self.command == "GET" and re.fullmatch(f"/api/datasets/{REPO}(?:/revision/{revision})?", path):
            return self._json({"id": REPO, "sha": COMMIT, "private": False,
                               "siblings": [{"rfilename": p} for p in sorted(self.files)]})
        if self.command == "GET" and (m := re.fullmatch(f"/api/datasets/{REPO}/tree/{revision}(?:/(.+))?", path)):
            folder = (m.group(1) or "").strip("/")
            entries = self._entries()
            if folder and not any(e["path"] == folder and e["type"] == "directory" for e in entries):
                return self._send(404, headers=(("X-Error-Code", "EntryNotFound"),))
            prefix = folder + "/" if folder else ""
            inside = [e for e in entries if e["path"].startswith(prefix) and e["path"] != folder]
            recursive = parse_qs(urlsplit(self.path).query).get("recursive", [""])[0].lower() == "true"
            return self._json(inside if recursive else [e for e in inside if "/" not in e["path"][len(prefix):]])
        self._send(404)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty Hugging Face home (hub and datasets caches); huggingface_hub and datasets read these when imported,
    so their module constants are set along with the environment."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    hub = huggingface_hub.constants
    monkeypatch.setattr(hub, "HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hub, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    yield home


def _hub_mode(monkeypatch: pytest.MonkeyPatch, offline: bool, endpoint: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for module, names in ((huggingface_hub.constants, ("HF_HUB_OFFLINE",)),
                          (datasets.config, ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        for name in names:
            monkeypatch.setattr(module, name, offline)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every address a socket of this process connects to; any but the loopback interface is refused."""
    seen: list[Any] = []
    connect = socket.socket.connect

    def recorded(sock: socket.socket, address: Any) -> None:
        seen.append(address)
        if not (isinstance(address, tuple) and address[0] == "127.0.0.1"):
            raise ConnectionRefusedError(f"the test allows loopback connections only, not {address!r}")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recorded)
    return seen


def test_a_hub_dataset_id_downloads_once_then_loads_offline_from_the_cache(
        hf_home: Path, connections: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from fedlora.experiment import build
    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    files = {f"data/{split}-00000-of-00001.parquet": _parquet(split) for split in SIZES}
    handler = type("Hub", (_FakeHub,), {"files": files, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    overrides = ("data.dataset=hf", f"data.path={REPO}", "data.text_column=sentence", "data.test_split=validation",
                 "data.max_examples=0", "train.rounds=1")
    try:
        _hub_mode(monkeypatch, False, endpoint)
        online = build(tiny_config(*overrides))
        simulation.run(online.config, RunDir(tmp_path / "online"), progress=False, exp=online)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()
    requests = handler.requests
    # the data came from the fake Hub: both parquet files were downloaded, through a bounded number of requests
    for name in files:
        assert f"GET /datasets/{REPO}/resolve/{COMMIT}/{name}" in requests, requests
    assert len(requests) <= 30, requests
    assert connections and set(connections) == {("127.0.0.1", server.server_port)}
    train, validation = _rows("train", 60), _rows("validation", 20)
    ds = online.dataset
    assert (ds.name, ds.label_names, len(ds)) == ("sst2-mini", ("negative", "positive"), 80)
    assert ds.texts == tuple(train["sentence"] + validation["sentence"])
    assert ds.labels.tolist() == train["label"] + validation["label"]
    assert np.array_equal(online.split.global_test, np.arange(60, 80))  # the validation split is the test set
    assert sum(c.num_examples for c in online.split.clients) == 60
    summary = json.loads((tmp_path / "online" / "summary.json").read_text())
    assert summary["rounds"] == 1 and 0.0 <= summary["acc_personal_mean"] <= 1.0
    assert "path = \"acme/sst2-mini\"" in (tmp_path / "online" / "config.toml").read_text()

    # The Hub gone and HF_HUB_OFFLINE=1: the same config loads from the cache the download left, the same run.
    connections.clear()
    _hub_mode(monkeypatch, True, endpoint)
    offline = build(tiny_config(*overrides))
    simulation.run(offline.config, RunDir(tmp_path / "offline"), progress=False, exp=offline)
    assert connections == []
    assert (offline.dataset.texts, offline.dataset.labels.tolist(), offline.dataset.label_names) == (
        ds.texts, ds.labels.tolist(), ds.label_names)
    assert np.array_equal(offline.split.global_test, online.split.global_test)
    assert comparable(tmp_path / "offline") == comparable(tmp_path / "online")

    # An id never loaded, offline: the one-line refusal, and no connection.
    capsys.readouterr()
    args = [a for o in (*TINY, *overrides[:-1], "data.path=acme/never-loaded") for a in ("--set", o)]
    assert main(["run", *args, "--out", str(tmp_path / "never"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "never").exists() and connections == []
    assert ("data.path = 'acme/never-loaded': no such local file or folder, and the datasets library cannot load it "
            "as a Hub dataset and HF_HUB_OFFLINE=1 forbids downloading it; load it once online (or unset "
            "HF_HUB_OFFLINE): Couldn't reach 'acme/never-loaded' on the Hub (OfflineModeIsEnabled)") in err
