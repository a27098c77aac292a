"""etcd store URLs: endpoints, TLS files and credentials, checked before anything connects.

Owns: parsing `etcd://` / `etcds://` URLs into `EtcdUrl` (endpoints, `EtcdTls`, `EtcdAuth`),
reading the files they name, and `redact_store_url` for printing a URL. It must not open
connections (`etcd.py` does) or import gRPC.

    etcd://h1:2379,h2:2379                         plaintext, no authentication
    etcds://h1:2379                                TLS, members verified against the system CAs
    etcd://h1:2379?cacert=/p/ca.pem                TLS (any TLS option turns it on)
      &cert=/p/client.pem&key=/p/client-key.pem    client certificate (both or neither)
      &user=hivenet&password_file=/p/pw            etcd user; the password from a file ...
      &user=hivenet&password_env=HN_ETCD_PASSWORD  ... or from an environment variable

A password is never accepted in the URL itself (`password=`, `user:pw@`): URLs end up on
command lines (`ps`) and in logs. Without `user`, a member running `--client-cert-auth` takes
the client certificate's common name as the etcd user. Every problem is one
InvalidRequestError naming the option and its value or path.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl

from hivenet.store.base import InvalidRequestError

__all__ = [
    "ETCD_SCHEMES",
    "ETCD_TLS_SCHEME",
    "EtcdAuth",
    "EtcdTls",
    "EtcdUrl",
    "check_endpoint",
    "parse_etcd_url",
    "redact_store_url",
]

ETCD_PLAIN_SCHEME: Final = "etcd://"
ETCD_TLS_SCHEME: Final = "etcds://"
ETCD_SCHEMES: Final = (ETCD_PLAIN_SCHEME, ETCD_TLS_SCHEME)
_TLS_OPTIONS: Final = ("cacert", "cert", "key")
_OPTIONS: Final = (*_TLS_OPTIONS, "user", "password_file", "password_env")
_REDACTED: Final = "***"
# `password=<value>` in a query, and `user:password@` before a host.
_PASSWORD_PARAM: Final = re.compile(r"(?i)([?&;]password=)[^&;#]*")
_USERINFO_PASSWORD: Final = re.compile(r"^([a-z][a-z0-9+.-]*://[^/@:?#]*):[^/@?#]*@", re.I)


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """What a TLS connection to the members needs, as PEM bytes read at parse time."""

    ca_pem: bytes | None  # None: gRPC's own root certificates
    cert_pem: bytes | None  # the client certificate (chain), or None
    key_pem: bytes | None = field(repr=False)
    ca_source: str  # for messages: the file the CAs came from


@dataclass(frozen=True, slots=True)
class EtcdAuth:
    """An etcd user and its password (read from `source`, never from the URL)."""

    user: str
    password: str = field(repr=False)
    source: str  # for messages: "password_file '/p/pw'" or "password_env 'VAR'"


@dataclass(frozen=True, slots=True)
class EtcdUrl:
    endpoints: tuple[str, ...]
    tls: EtcdTls | None
    auth: EtcdAuth | None


def redact_store_url(url: str) -> str:
    """`url` with any password in it replaced by ***: what to print or log of a store URL."""
    if not isinstance(url, str):
        return repr(url)
    return _USERINFO_PASSWORD.sub(rf"\1:{_REDACTED}@", _PASSWORD_PARAM.sub(rf"\1{_REDACTED}", url))


def check_endpoint(endpoint: str, url: str) -> str:
    """`host:port` normalised, or InvalidRequestError naming the (redacted) URL and endpoint."""
    host, colon, port_text = endpoint.rpartition(":")
    problem = ""
    if not colon or not host:
        problem = "expected host:port"
    elif not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        problem = f"port {port_text!r} is not a number in 1..65535"
    elif host.startswith("[") != host.endswith("]") or any(c in host for c in "/@?# "):
        problem = f"host {host!r} is not a host name or address"
    if problem:
        raise InvalidRequestError(
            f"store url {redact_store_url(url)!r}: endpoint {endpoint!r}: {problem}"
        )
    return f"{host}:{int(port_text)}"


def parse_etcd_url(url: str) -> EtcdUrl:
    """Endpoints, TLS material and credentials of an etcd store URL (see the module docstring);
    reads and checks every file it names. InvalidRequestError for anything wrong."""
    if not isinstance(url, str) or not url.startswith(ETCD_SCHEMES):
        raise InvalidRequestError(
            f"store url {redact_store_url(url)!r} is not an etcd URL "
            "(expected 'etcd://host:port,...' or 'etcds://host:port,...')"
        )
    shown = redact_store_url(url)
    scheme = ETCD_TLS_SCHEME if url.startswith(ETCD_TLS_SCHEME) else ETCD_PLAIN_SCHEME
    body, _, query = url[len(scheme) :].partition("?")
    if "@" in body.partition("/")[0] and ":" in body.partition("@")[0]:
        raise InvalidRequestError(
            f"store url {shown!r}: a password in the URL is not accepted (it would show in "
            "ps and logs); use user=NAME with password_file=PATH or password_env=VAR"
        )
    body = body.rstrip("/")
    if not body:
        raise InvalidRequestError(f"store url {shown!r} names no etcd endpoint")
    endpoints = tuple(check_endpoint(part.strip(), url) for part in body.split(","))
    options = _options(query, shown)
    tls = None
    if scheme == ETCD_TLS_SCHEME or any(name in options for name in _TLS_OPTIONS):
        tls = _tls(options, shown)
    return EtcdUrl(endpoints=endpoints, tls=tls, auth=_auth(options, shown))


def _options(query: str, shown: str) -> dict[str, str]:
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as error:
        raise InvalidRequestError(f"store url {shown!r}: bad query ({error})") from None
    for name, value in pairs:
        if name == "password":
            raise InvalidRequestError(
                f"store url {shown!r}: option password is not accepted (a password in the URL "
                "would show in ps and logs); use password_file=PATH or password_env=VAR"
            )
        if name not in _OPTIONS:
            raise InvalidRequestError(
                f"store url {shown!r}: unknown option {name!r} (known: {', '.join(_OPTIONS)})"
            )
        if name in options:
            raise InvalidRequestError(f"store url {shown!r}: option {name} given twice")
        if not value:
            raise InvalidRequestError(f"store url {shown!r}: option {name} has no value")
        options[name] = value
    return options


def _read(options: dict[str, str], name: str, shown: str) -> bytes:
    path = options[name]
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise InvalidRequestError(
            f"store url {shown!r}: option {name}: cannot read {path!r} ({error.strerror})"
        ) from None


def _tls(options: dict[str, str], shown: str) -> EtcdTls:
    if ("cert" in options) != ("key" in options):
        given, missing = ("cert", "key") if "cert" in options else ("key", "cert")
        raise InvalidRequestError(
            f"store url {shown!r}: option {given}={options[given]!r} needs option {missing} too "
            "(a client certificate goes with its key)"
        )
    ca_pem = cert_pem = key_pem = None
    checker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if "cacert" in options:
        ca_pem = _read(options, "cacert", shown)
        ca_source = options["cacert"]
        try:
            checker.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            raise InvalidRequestError(
                f"store url {shown!r}: option cacert: {ca_source!r} holds no PEM CA "
                f"certificate ({error})"
            ) from None
    else:
        # The system's CA bundle (Debian: /etc/ssl/certs/ca-certificates.crt); gRPC's own
        # roots where there is none.
        ca_source = ssl.get_default_verify_paths().cafile or "gRPC's built-in roots"
        if Path(ca_source).is_file():
            ca_pem = Path(ca_source).read_bytes()
    if "cert" in options:
        cert_pem = _read(options, "cert", shown)
        key_pem = _read(options, "key", shown)
        try:
            checker.load_cert_chain(options["cert"], options["key"])
        except (ssl.SSLError, OSError) as error:
            raise InvalidRequestError(
                f"store url {shown!r}: options cert={options['cert']!r} and "
                f"key={options['key']!r} are not a PEM certificate and its private key ({error})"
            ) from None
    return EtcdTls(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, ca_source=ca_source)


def _auth(options: dict[str, str], shown: str) -> EtcdAuth | None:
    sources = [name for name in ("password_file", "password_env") if name in options]
    if "user" not in options:
        if sources:
            raise InvalidRequestError(
                f"store url {shown!r}: option {sources[0]} needs option user (whose password?)"
            )
        return None
    user = options["user"]
    if not sources:
        raise InvalidRequestError(
            f"store url {shown!r}: option user={user!r} needs password_file=PATH or "
            "password_env=VAR (without user, etcd takes the client certificate's name)"
        )
    if len(sources) > 1:
        raise InvalidRequestError(
            f"store url {shown!r}: give one of password_file and password_env, not both"
        )
    if sources[0] == "password_file":
        source = f"password_file {options['password_file']!r}"
        password = _read(options, "password_file", shown).decode("utf-8", "replace")
        password = password.rstrip("\r\n")
    else:
        variable = options["password_env"]
        source = f"password_env {variable!r}"
        if variable not in os.environ:
            raise InvalidRequestError(
                f"store url {shown!r}: option password_env: environment variable "
                f"{variable!r} is not set"
            )
        password = os.environ[variable]
    if not password:
        raise InvalidRequestError(f"store url {shown!r}: option {source} gives an empty password")
    return EtcdAuth(user=user, password=password, source=source)
