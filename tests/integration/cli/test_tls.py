"""HTTPS end to end: a real `hivenet serve --tls-cert/--tls-key` process on 127.0.0.1 (its
certificate signed by a CA made in the test), the `hivenet` CLI and `HivenetClient` against
it (verification on by default, `--ca-cert` / $HIVENET_CA_CERT / config `ca_cert`, `--insecure`
warns), plain HTTP to the TLS port, the request body limit (`--max-body-bytes`) through the
real server, and `hivenet serve` refusing unusable TLS files before it starts."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hivenet.api.client import HivenetClient, InsecureTlsWarning, TlsVerificationError
from tests.integration.cli.conftest import Hivenet, hivenet_for
from tests.integration.openstack.served import Served, serve
from tests.integration.tlsfiles import TlsFiles, make_tls_files

MAX_BODY = 4096


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("hn-tls-files"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("hn-tls-serve")
    with serve(directory, "--max-body-bytes", str(MAX_BODY), tls=tls) as running:
        yield running


@pytest.fixture
def cli(served: Served, isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> Hivenet:
    return hivenet_for(served.base_url, served.admin_token, monkeypatch)


def _verifying(tls: TlsFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca_cert))


def test_serve_prints_the_https_url(served: Served) -> None:
    log = (served.state_dir.parent / "serve.log").read_text()
    assert f"API on {served.base_url} " in log, log
    assert f"max request body {MAX_BODY} bytes" in log, log


# ---- the CLI


def test_cli_with_the_ca_creates_and_lists(
    cli: Hivenet, tls: TlsFiles, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"tls-{uuid.uuid4().hex[:8]}"
    created = cli.ok("--ca-cert", str(tls.ca_cert), "bridge", "create", "--name", name, "-q")
    bridge_id = created.stdout.strip()
    assert "warning" not in created.stderr
    listed = cli.json("--ca-cert", str(tls.ca_cert), "bridge", "list")
    assert {(b["id"], b["name"]) for b in listed["items"]} >= {(bridge_id, name)}

    # The same CA from the environment, then from the config file (relative to its folder).
    monkeypatch.setenv("HIVENET_CA_CERT", str(tls.ca_cert))
    assert bridge_id in {b["id"] for b in cli.json("bridge", "list")["items"]}
    monkeypatch.delenv("HIVENET_CA_CERT")
    config = isolated_env / ".config" / "hivenet" / "config.yaml"
    config.parent.mkdir(parents=True)
    (config.parent / "ca.pem").write_bytes(tls.ca_cert.read_bytes())
    config.write_text("ca_cert: ca.pem\n")
    assert bridge_id in {b["id"] for b in cli.json("bridge", "list")["items"]}
    shown = cli.json("config", "show")["ca_cert"]
    assert shown == {"value": str(config.parent / "ca.pem"), "source": f"config file {config}"}


def test_cli_without_the_ca_fails_in_one_line(served: Served, tmp_path: Path) -> None:
    """A real process, so that what the user sees is all there is (no traceback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVENET_")}
    env |= {"HOME": str(tmp_path), "HIVENET_API_URL": served.base_url}
    env |= {"HIVENET_TOKEN": served.admin_token, "COLUMNS": "400"}
    result = subprocess.run(
        [sys.executable, "-m", "hivenet.cli", "bridge", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: the TLS certificate of {served.base_url} was refused")
    assert "unable to get local issuer certificate" in lines[0]
    assert "pass --ca-cert PATH" in lines[0] and "HIVENET_CA_CERT" in lines[0]


def test_cli_with_another_ca_names_it(cli: Hivenet, tls: TlsFiles) -> None:
    result = cli.fails("--ca-cert", str(tls.other_ca_cert), "bridge", "list")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"by the CA in {tls.other_ca_cert} (from --ca-cert option)" in lines[0]


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "no such file"), (b"hello\n", "not a PEM CA certificate bundle")],
)
def test_cli_unusable_ca_file_is_named(
    cli: Hivenet, tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    result = cli.fails("--ca-cert", str(path), "bridge", "list")
    assert f"error: CA bundle {path} (from --ca-cert option): {reason}" in result.stderr


def test_insecure_works_and_warns_every_time(cli: Hivenet, served: Served) -> None:
    for _ in range(2):
        result = cli.ok("--insecure", "bridge", "list", "--json")
        assert "items" in result.stdout
        warning = f"warning: --insecure: the TLS certificate of {served.base_url} is NOT verified"
        assert warning in result.stderr


def test_plain_http_to_the_tls_port_fails(cli: Hivenet, served: Served) -> None:
    plain = served.base_url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/v1/health", timeout=5)
    result = cli.fails("--api-url", plain, "host", "list")
    assert f"cannot reach the HiveNet API at {plain}" in result.stderr
    assert "a server run with --tls-cert wants an https:// URL" in result.stderr


# ---- the Python client


def test_client_verifies_by_default(served: Served, tls: TlsFiles) -> None:
    with HivenetClient(served.base_url, served.admin_token, ca_cert=tls.ca_cert) as client:
        assert client.health()["status"] == "ok"
    with (
        HivenetClient(served.base_url, served.admin_token) as client,
        pytest.raises(TlsVerificationError, match="unable to get local issuer certificate"),
    ):
        client.health()
    with pytest.warns(InsecureTlsWarning, match=served.base_url):
        insecure = HivenetClient(served.base_url, served.admin_token, insecure=True)
    with insecure:
        assert insecure.health()["status"] == "ok"


# ---- the body limit through the real server


def _post(served: Served, tls: TlsFiles, path: str, content: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {served.admin_token}"}
    headers["Content-Type"] = "application/json"
    return httpx.post(
        f"{served.base_url}{path}",
        content=content,  # type: ignore[arg-type]
        headers=headers,
        verify=_verifying(tls),
        timeout=10,
    )


def _padded_bridge(size: int) -> bytes:
    body = f'{{"name": "pad-{uuid.uuid4().hex[:8]}"}}'.encode()
    return body + b" " * (size - len(body))  # JSON allows trailing whitespace


def test_body_at_the_limit_passes_and_one_byte_more_is_413(served: Served, tls: TlsFiles) -> None:
    assert _post(served, tls, "/v1/bridges", _padded_bridge(MAX_BODY)).status_code == 201
    refused = _post(served, tls, "/v1/bridges", _padded_bridge(MAX_BODY + 1))
    assert refused.status_code == 413
    error = refused.json()["error"]
    assert error["status"] == 413
    assert error["message"] == (
        f"request body too large: Content-Length {MAX_BODY + 1} bytes, "
        f"the limit is {MAX_BODY} bytes"
    )
    assert error["details"] == [
        {
            "field": "Content-Length",
            "value": MAX_BODY + 1,
            "message": f"over the limit of {MAX_BODY} bytes",
        }
    ]


def test_chunked_body_over_the_limit_is_413(served: Served, tls: TlsFiles) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        body = _padded_bridge(total)
        for start in range(0, total, 1000):
            yield body[start : start + 1000]

    passed = _post(served, tls, "/v1/bridges", chunks(MAX_BODY))
    assert passed.status_code == 201, passed.text
    assert "content-length" not in passed.request.headers
    refused = _post(served, tls, "/v1/bridges", chunks(3 * MAX_BODY))
    assert refused.request.headers["transfer-encoding"] == "chunked"
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    # How much arrived by the time the limit was crossed depends on how uvicorn batched the
    # chunks (test_body_limit.py pins the exact cut on the middleware itself).
    received = error["details"][0]["value"]
    assert MAX_BODY < received <= 3 * MAX_BODY, error
    assert error["message"] == (
        f"request body too large: {received} bytes received so far, the limit is {MAX_BODY} bytes"
    )
    assert error["details"][0]["field"] == "body"


def test_neutron_and_octavia_are_limited_too(served: Served, tls: TlsFiles) -> None:
    big = b'{"network": {"name": "' + b"n" * MAX_BODY + b'"}}'
    for path in ("/v2.0/networks", "/v2.0/lbaas/loadbalancers"):
        refused = _post(served, tls, path, big)
        assert refused.status_code == 413, (path, refused.text)
        assert f"the limit is {MAX_BODY} bytes" in refused.json()["error"]["message"]


# ---- `hivenet serve` refuses unusable TLS files before it starts


def _serve_fails(tmp_path: Path, *tls_args: str, code: int = 1) -> str:
    result = Hivenet().fails(
        "serve", "--state-dir", str(tmp_path / "state"), "--port", "1", *tls_args, code=code
    )
    # Usage errors come in a panel as wide as the terminal: its lines joined, the message
    # reads whole wherever the panel broke it (the temporary paths' length moves the breaks).
    return " ".join(result.stderr.replace("\u2502", " ").split())


def test_serve_refuses_unusable_tls_files(tmp_path: Path, tls: TlsFiles) -> None:
    missing = tmp_path / "missing.pem"
    cert, key = str(tls.server_cert), str(tls.server_key)
    stderr = _serve_fails(tmp_path, "--tls-cert", str(missing), "--tls-key", key)
    assert f"error: --tls-cert {missing}: no such file" in stderr
    stderr = _serve_fails(tmp_path, "--tls-cert", key, "--tls-key", key)
    assert f"error: --tls-cert {key}: not a PEM certificate" in stderr
    stderr = _serve_fails(tmp_path, "--tls-cert", cert, "--tls-key", cert)
    assert f"error: --tls-key {cert}: not a PEM private key" in stderr
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nnot base64 !\n-----END CERTIFICATE-----\n")
    stderr = _serve_fails(tmp_path, "--tls-cert", str(garbled), "--tls-key", key)
    assert f"error: --tls-cert {garbled}: not a valid PEM certificate" in stderr
    other = make_tls_files(tmp_path / "other")
    stderr = _serve_fails(tmp_path, "--tls-cert", cert, "--tls-key", str(other.server_key))
    assert f"--tls-key {other.server_key}: is not the private key of the certificate" in stderr
    stderr = _serve_fails(tmp_path, "--tls-cert", cert, code=2)
    assert "--tls-cert" in stderr and "needs --tls-key too" in stderr
