"""The real `openstack` CLI against `hivenet serve` over HTTPS: with `--os-cacert` naming the
CA that signed the server's certificate it works; without it the client refuses the server
(the server is the one of served.py, run with `tls=`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.openstack.served import serve
from tests.integration.tlsfiles import make_tls_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_openstack_cli_over_tls(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    with serve(tmp_path, tls=tls) as served:
        assert served.base_url.startswith("https://")
        trusting = ("--os-cacert", str(tls.ca_cert))
        network = served.cli(*trusting, "network", "create", "tls-net", "-f", "json")
        listed = served.cli(*trusting, "network", "list", "-f", "json")
        assert network["id"] in {n["ID"] for n in listed}
        refused = served.cli("network", "list", "-f", "json", check=False)
        assert refused.returncode != 0
        # keystoneauth reports the refused certificate as a failed version discovery.
        assert f"Unable to find a version discovery document at {served.base_url}/" in (
            refused.stderr
        )
