"""A running `hivenet serve` for the real OpenStack clients: the server as a subprocess on
127.0.0.1 (auth_type none acting for project `demo`), a generated clouds.yaml with both
endpoint override forms, and `Served.cli(...)` running the `openstack` command against it.
`serve(..., tls=)` runs it over HTTPS (and the readiness check verifies its certificate);
further `hivenet serve` options go in `extra_args`. The server is this interpreter's
`python -m hivenet.cli`, so it runs the sources under test.

Owns only the process and the files it makes in the test's tmp dir; always stops the server.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.integration.tlsfiles import TlsFiles

VENV_BIN = Path(sys.executable).parent
NOAUTH_PROJECT = "demo"
# A cloud whose overrides name the server's root (the documented form) and one whose
# overrides end in /v2.0 (also accepted).
ROOT_CLOUD = "hn"
VERSIONED_CLOUD = "hn-v2"
# The cluster admin: keystoneauth's admin_token plugin sends the server's admin token.
ADMIN_CLOUD = "hn-admin"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    base_url: str
    clouds_yaml: Path
    state_dir: Path

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin-token").read_text().strip()

    def env(self) -> dict[str, str]:
        return {**os.environ, "OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml)}

    def cli(self, *args: str, cloud: str = ROOT_CLOUD, check: bool = True) -> Any:
        """`openstack --os-cloud <cloud> <args> -f json` -> the parsed output (or the
        CompletedProcess when check is False). Commands that print nothing return None."""
        command = [str(VENV_BIN / "openstack"), "--os-cloud", cloud, *args]
        result = subprocess.run(
            command, env=self.env(), capture_output=True, text=True, timeout=180
        )
        if not check:
            return result
        assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}{result.stdout}"
        return json.loads(result.stdout) if result.stdout.strip() else None

    def issue_token_cloud(self, name: str, project: str, role: str) -> str:
        """A new `/v1/tokens` token of `project` with `role` (issued by the cluster admin),
        added to clouds.yaml as cloud `name` (keystoneauth's admin_token plugin sends it as
        X-Auth-Token); returns the cloud's name."""
        response = httpx.post(
            f"{self.base_url}/v1/tokens",
            json={"project": project, "role": role},
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        clouds = yaml.safe_load(self.clouds_yaml.read_text())
        base = f"{self.base_url}/"
        clouds["clouds"][name] = {
            **clouds["clouds"][ADMIN_CLOUD],
            "auth": {"token": response.json()["secret"], "endpoint": base},
        }
        self.clouds_yaml.write_text(yaml.safe_dump(clouds))
        return name


def write_clouds_yaml(path: Path, base_url: str, admin_token: str) -> None:
    def cloud(endpoint: str) -> dict[str, Any]:
        return {
            "auth_type": "none",
            "network_endpoint_override": endpoint,
            "load_balancer_endpoint_override": endpoint,
            # The project lookup of `openstack quota ...` (api/neutron/identity.py).
            "identity_endpoint_override": f"{base_url}/identity/v3",
        }

    admin = {
        **cloud(f"{base_url}/"),
        "auth_type": "admin_token",
        "auth": {"token": admin_token, "endpoint": f"{base_url}/"},
    }
    clouds = {
        "clouds": {
            ROOT_CLOUD: cloud(f"{base_url}/"),
            VERSIONED_CLOUD: cloud(f"{base_url}/v2.0"),
            ADMIN_CLOUD: admin,
        }
    }
    path.write_text(yaml.safe_dump(clouds))


@contextmanager
def serve(tmp_path: Path, *extra_args: str, tls: TlsFiles | None = None) -> Iterator[Served]:
    port = free_port()
    state_dir = tmp_path / "hn-state"
    log = (tmp_path / "serve.log").open("w")
    tls_args = [] if tls is None else [
        "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
    ]  # fmt: skip
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hivenet.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
            "--openstack-noauth-project",
            NOAUTH_PROJECT,
            *tls_args,
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"{'http' if tls is None else 'https'}://127.0.0.1:{port}"
    verify = True if tls is None else ssl.create_default_context(cafile=str(tls.ca_cert))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base_url}/", timeout=2, verify=verify).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "hivenet serve did not come up"
            time.sleep(0.2)
        clouds_yaml = tmp_path / "clouds.yaml"
        write_clouds_yaml(clouds_yaml, base_url, (state_dir / "admin-token").read_text().strip())
        yield Served(base_url, clouds_yaml, state_dir)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
