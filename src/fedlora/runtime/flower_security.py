"""TLS and SuperNode authentication for the launcher's Flower federations (docs/privacy.md, docs/flower.md).

With :class:`fedlora.privacy.certs.Credentials`, ``flower_launch.run_local`` starts the SuperLink with its TLS
certificate and ``--enable-supernode-auth``, points the ``flwr`` CLI at the CA, registers each client's public key
(``flwr supernode register``) before its SuperNode starts, and starts each SuperNode with the CA and its own private
key. Without credentials every party runs ``--insecure`` on 127.0.0.1, as before. The Runtime API between a
SuperNode and fedlora's warm executor stays on 127.0.0.1 without TLS (same host, same user).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlora.privacy.certs import Credentials


def link_args(creds: Credentials | None) -> list[str]:
    """The SuperLink's security flags."""
    if creds is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(creds.ca), "--ssl-certfile", str(creds.server_cert),
            "--ssl-keyfile", str(creds.server_key), "--enable-supernode-auth"]


def connection_lines(creds: Credentials | None) -> str:
    """The security lines of the ``flwr`` CLI's connection to the SuperLink (``FLWR_HOME/config.toml``)."""
    return "insecure = true\n" if creds is None else f'root-certificates = "{creds.ca}"\n'


def node_args(creds: Credentials | None, client: int) -> list[str]:
    """SuperNode ``client``'s security flags: the CA it trusts and the private key it authenticates with."""
    if creds is None:
        return ["--insecure"]
    if client >= len(creds.node_keys):
        from fedlora.errors import FedloraError

        raise FedloraError(f"the credentials hold {len(creds.node_keys)} node key(s); client {client} has none "
                           "(python -m fedlora.privacy.certs DIR --nodes <num_clients>)")
    return ["--root-certificates", str(creds.ca), "--auth-supernode-private-key", str(creds.node_keys[client])]


def registrations(creds: Credentials | None, clients: int, connection: str) -> list[list[str]]:
    """The ``flwr`` commands that register the public key of each client's SuperNode (none without credentials)."""
    if creds is None:
        return []
    return [["supernode", "register", f"{creds.node_keys[c]}.pub", connection] for c in range(clients)]
