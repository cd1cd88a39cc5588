"""Credentials for a Flower deployment, generated with the ``cryptography`` package (no cryptography of our own):
a certificate authority, a TLS certificate of the SuperLink signed by it, and one ECDSA P-384 key pair per
SuperNode for SuperNode authentication (OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes them).

    python -m fedlora.privacy.certs DIR [--hosts 127.0.0.1 localhost link.example.org] [--nodes 3]

writes ``DIR/ca.crt``, ``DIR/ca.key``, ``DIR/server.pem``, ``DIR/server.key`` and ``DIR/keys/node<k>`` /
``node<k>.pub``. For prototypes and tests (docs/privacy.md); in production use your organisation's PKI. Keys are
written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Credentials:
    ca: Path  # the CA certificate every party trusts (--ssl-ca-certfile, --root-certificates)
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys (--auth-supernode-private-key); the public key is <path>.pub


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common: str) -> object:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def node_key(path: Path) -> Path:
    """An ECDSA P-384 key pair for SuperNode authentication: ``path`` (private, OpenSSH) and ``path``.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(path.with_name(path.name + ".pub"),
           key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return path


def generate(folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), nodes: int = 0,
             days: int = 30) -> Credentials:
    """A CA, a server certificate valid for ``hosts`` (IP addresses and DNS names) and ``nodes`` node key pairs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM

    def key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedlora test CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(alt), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    _write(folder / "ca.crt", ca.public_bytes(pem))
    _write(folder / "ca.key", key_bytes(ca_key), private=True)
    _write(folder / "server.pem", server.public_bytes(pem))
    _write(folder / "server.key", key_bytes(server_key), private=True)
    keys = tuple(node_key(folder / "keys" / f"node{k}") for k in range(nodes))
    return Credentials(folder / "ca.crt", folder / "server.pem", folder / "server.key", keys)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"], help="names of the SuperLink's host")
    ap.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to create")
    ap.add_argument("--days", type=int, default=30)
    args = ap.parse_args(argv)
    creds = generate(args.folder, args.hosts, args.nodes, args.days)
    print(f"CA {creds.ca}\nserver certificate {creds.server_cert} (key {creds.server_key}) for {' '.join(args.hosts)}")
    for k in creds.node_keys:
        print(f"node key {k} (register {k}.pub with: flwr supernode register {k}.pub <connection>)")


if __name__ == "__main__":
    main()
