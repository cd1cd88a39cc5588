"""A warm ClientApp executor for a SuperNode started with ``--isolation process``.

Flower 1.41's default (``--isolation subprocess``) starts a new ``flwr-clientapp`` process for every message:
each message would pay Python start-up, ``import torch``, model loading and tokenization (seconds to tens of
seconds) before a few seconds of training. This executor takes the place of ``flower-superexec`` next to one
SuperNode: it acquires each ClientApp task from the SuperNode's Runtime API, as ``flower-superexec`` does,
and runs fedlora's ClientApp *in this process*, so the experiment built for the first message (model, adapter,
tokenized partition) serves every later one.

The task protocol is Flower's own (``flwr.supernode.runtime.run_clientapp``: pull the task input, call the
ClientApp, push the reply and the updated Context); only the process is kept. State that must survive the
node (the client's adapter, FedSA's B side and head) still lives in ``context.state`` on the SuperNode.
It serves only fedlora's app: a task of another app gets an error reply.

    flower-supernode --isolation process --port 9094 ... &
    python -m fedlora.runtime.flower_node --runtime-api-address 127.0.0.1:9094 --insecure
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

APP_ID = "fedlora/fedlora-flower"  # [tool.flwr.app].publisher / [project].name of the packaged app


def _log(text: str) -> None:
    print(f"[fedlora-node {os.getpid()}] {text}", file=sys.stderr, flush=True)


def _client(address: str, insecure: bool, root_certificates: str | None, component: str, token: str | None) -> Any:
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=None if insecure else root_certificates,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def _heartbeat(client: Any) -> Any:
    """Flower's task heartbeat, except that a refused heartbeat (the run was stopped) is logged instead of
    raising SIGINT in this long-lived process."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
    from flwr.supercore.heartbeat import HeartbeatSender

    def beat() -> bool:
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                _log("the SuperNode refused a task heartbeat (run stopped?)")
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        return True

    return HeartbeatSender(beat)


def run_task(address: str, token: str, insecure: bool, root_certificates: str | None) -> None:
    """Run one ClientApp task in this process (the body of Flower's ``run_clientapp`` without the exit)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from fedlora.runtime.flower_app import client_app

    client = _client(address, insecure, root_certificates, "flwr-clientapp", token)
    beat = _heartbeat(client)
    beat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, _fab = pull_task_input(client)
        app_id = f"{run.fab_id}"
        if app_id != APP_ID:
            raise RuntimeError(f"this executor serves only the {APP_ID} app, not {app_id!r}")
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - reported to the server as the message's error, like Flower does
        reason = f"{type(ex)}:<'{ex}'>"
        _log(f"ClientApp raised: {reason}")
        details = reason
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            beat.stop()
            client.close()


def _watch_parent(pid: int) -> None:
    """Exit when the SuperNode is gone: this process must never outlive it."""
    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _log(f"SuperNode {pid} is gone; exiting")
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def serve(address: str, insecure: bool = True, root_certificates: str | None = None, poll: float = 0.2,
          parent_pid: int | None = None) -> None:
    """Acquire and run ClientApp tasks until terminated (SIGTERM / SIGINT) or the parent exits."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    import fedlora.runtime.flower_app  # noqa: F401 - import torch, transformers, fedlora once, before any task

    if parent_pid is not None:
        _watch_parent(parent_pid)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    acquirer = _client(address, insecure, root_certificates, "SuperExec", None)
    _log(f"serving ClientApp tasks from the SuperNode at {address}")
    try:
        while not stop.is_set():
            try:
                res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as e:  # noqa: BLE001 - the SuperNode may not be up yet, or restarting
                _log(f"AcquireTask failed: {e}")
                stop.wait(1.0)
                continue
            if res.HasField("task") and res.token:
                run_task(address, res.token, insecure, root_certificates)
            else:
                stop.wait(poll)  # the SuperNode pulls from the SuperLink every 3 s when idle: that dominates
    finally:
        acquirer.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedlora.runtime.flower_node", description=__doc__.split("\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (same host only)")
    p.add_argument("--root-certificates", help="CA certificate of the SuperNode's Runtime API (TLS)")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between task requests when idle")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    args = p.parse_args(argv)
    serve(args.runtime_api_address, args.insecure, args.root_certificates, args.poll, args.parent_pid)


if __name__ == "__main__":
    main()
