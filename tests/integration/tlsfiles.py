"""Throwaway TLS files for the API tests: a CA, a server certificate it signs for 127.0.0.1
(an IP subjectAltName, as clients match an IP URL) with its key, and a second CA that signed
nothing (a bundle that must not verify the server). Made by `hivenet.lab.pki`.

Owns only writing these PEM files into a directory the test gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hivenet.lab.pki import new_ca


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path  # a CA that did not sign the server's certificate


def make_tls_files(directory: Path, address: str = "127.0.0.1") -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca = new_ca("hivenet test CA")
    server = ca.issue_server(directory, "server", (address,))
    return TlsFiles(
        ca_cert=ca.write_cert(directory / "ca.pem"),
        server_cert=server.cert,
        server_key=server.key,
        other_ca_cert=new_ca("some other CA").write_cert(directory / "other-ca.pem"),
    )
