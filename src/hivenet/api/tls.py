"""TLS for the API, both sides, on the standard library's `ssl` alone (no server module is
imported here, so the client stays light).

Owns: checking the server's certificate and key files before the server starts
(`check_server_files`: each file readable, PEM, and the key the certificate's), the client's
verifying context (`client_ssl_context`: the system trust store or a CA bundle; verification
and hostname checks always on), the one context that verifies nothing (`insecure_ssl_context`,
only for an explicit request), and `verification_failure` (is this connection error a
certificate the client refused, and why). Must not decide policy such as when to warn.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY_SUFFIX = b"PRIVATE KEY-----"


class TlsFileError(ValueError):
    """A TLS file cannot be used. `role` is "cert", "key" or "ca_cert"."""

    def __init__(self, role: str, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.role = role
        self.path = path
        self.reason = reason


def _read(role: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsFileError(role, path, "no such file") from None
    except IsADirectoryError:
        raise TlsFileError(role, path, "is a directory, not a file") from None
    except OSError as exc:
        raise TlsFileError(role, path, f"cannot read it: {exc.strerror or exc}") from None


def _load_certificates(role: str, path: Path, what: str) -> None:
    """Fail unless `path` holds at least one PEM certificate OpenSSL can parse."""
    if _PEM_CERTIFICATE not in _read(role, path):
        raise TlsFileError(role, path, f"not a PEM {what} (no '{_PEM_CERTIFICATE.decode()}')")
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise TlsFileError(role, path, f"not a valid PEM {what}: {exc.reason or exc}") from None


def check_server_files(cert: Path, key: Path) -> None:
    """Raise `TlsFileError` naming the file at fault unless `cert` is a PEM certificate
    (chain) and `key` the unencrypted PEM private key that goes with it."""
    _load_certificates("cert", cert, "certificate")
    key_bytes = _read("key", key)
    if _PEM_PRIVATE_KEY_SUFFIX not in key_bytes:
        raise TlsFileError("key", key, "not a PEM private key (no '-----BEGIN ...PRIVATE KEY')")
    if b"ENCRYPTED" in key_bytes:
        raise TlsFileError("key", key, "the key is encrypted; give an unencrypted key file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            reason = f"is not the private key of the certificate {cert}"
            raise TlsFileError("key", key, reason) from None
        raise TlsFileError(
            "key", key, f"not a valid PEM private key: {exc.reason or exc}"
        ) from None


def client_ssl_context(ca_cert: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A context that verifies the server's certificate and name: against `ca_cert` (a PEM
    bundle) when given, else the system trust store (which $SSL_CERT_FILE / $SSL_CERT_DIR
    replace). Raises `TlsFileError` (role "ca_cert") for an unusable bundle."""
    if ca_cert is None:
        return ssl.create_default_context()
    path = Path(ca_cert)
    _load_certificates("ca_cert", path, "CA certificate bundle")
    return ssl.create_default_context(cafile=str(path))


def insecure_ssl_context() -> ssl.SSLContext:
    """A context that accepts any certificate for any name: encryption without
    authentication. Only for an explicit request (`hivenet --insecure`)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True, slots=True)
class VerificationFailure:
    reason: str  # OpenSSL's words: "unable to get local issuer certificate", "Hostname mismatch..."


def verification_failure(exc: BaseException) -> VerificationFailure | None:
    """The certificate verification error somewhere in `exc`'s chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return VerificationFailure(current.verify_message or current.reason or str(current))
        current = current.__cause__ or current.__context__
    return None
