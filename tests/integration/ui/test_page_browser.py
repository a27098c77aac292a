"""The live topology page in a real headless browser (Debian's chromium) against a running
`hivenet serve`: the page loads the vendored graph library (no CDN), shows the devices, and a
trace draws its path (DOM checks on the page's own markers); a screenshot is kept in the
test's tmp dir as an artifact."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hivenet.api.client import HivenetClient
from hivenet.api.ui import VENDORED_LIBRARY
from hivenet.store import open_store
from hivenet.store.keys import arp_entry_key, host_alive_key
from tests.integration.routed_topology import VM2_MAC, create_routed

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    base: str
    token: str
    store_url: str


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = _free_port()
    state_dir = tmp_path / "hn-state"
    store_url = f"sqlite://{tmp_path}/hn.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "hivenet.cli", "serve", "--store", store_url,
         "--port", str(port), "--state-dir", str(state_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # a loaded machine imports slowly
        while True:
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()  # so that reading its stderr ends
                _out, err = process.communicate(timeout=10)
                raise AssertionError(f"server did not start: {err!r}")
            time.sleep(0.1)
        token = (state_dir / "admin-token").read_text().strip()
        yield Server(base, token, store_url)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def build_topology(server: Server) -> dict[str, str]:
    """The shared routed topology; both hosts live; the router knows vm2's MAC (as agents
    would have learned it)."""
    with HivenetClient(server.base, server.token) as client:
        for host_id in ("h1", "h2"):
            client.create("host", {"id": host_id, "name": host_id})
        created = create_routed(lambda kind, body: client.create(kind, body).data)
    ids = {key: value if isinstance(value, str) else value["id"] for key, value in created.items()}

    async def liveness() -> None:
        store = open_store(server.store_url)
        try:
            lease = await store.lease_grant(300)
            for host_id in ("h1", "h2"):
                await store.put(host_alive_key(host_id), b"{}", lease=lease.id)
            await store.put(
                arp_entry_key(ids["router"], "10.0.2.20"), VM2_MAC.encode(), lease=lease.id
            )
        finally:
            await store.close()

    asyncio.run(liveness())
    return ids


def chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=8000",
         "--window-size=1280,800", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip


def test_page_shows_devices_and_draws_a_trace(server: Server, tmp_path: Path) -> None:
    assert VENDORED_LIBRARY.is_file(), "run `make install` (vendors the graph library)"
    ids = build_topology(server)
    assert httpx.get(f"{server.base}/ui/static/vendor/cytoscape.min.js").status_code == 200
    trace = {"from_port": ids["vm1"], "ip_dst": "10.0.2.20", "proto": "tcp", "dst_port": 80}
    fragment = urllib.parse.urlencode({"token": server.token, "trace": json.dumps(trace)})
    url = f"{server.base}/ui#{fragment}"

    dumped = chromium(tmp_path, url, "--dump-dom")
    dom = dumped.stdout
    assert 'data-loaded="true"' in dom, dumped.stderr[-2000:]
    # Every device of the topology is listed, with its kind.
    for key, kind in (
        ("net-a", "bridge"),
        ("net-b", "bridge"),
        ("router", "router"),
        ("vm1", "vm"),
    ):
        assert re.search(rf'data-id="{ids[key]}" data-kind="{kind}"', dom), key
    assert 'data-id="host:h1" data-kind="host"' in dom and "[live]" in dom
    # The trace ran and marked its path: both bridges, the router, the egress VM and host.
    assert 'data-trace="forwarded"' in dom
    on_path = {
        re.search(r'data-id="([^"]+)"', item).group(1)  # type: ignore[union-attr]
        for item in re.findall(r"<li [^>]*>", dom)
        if 'class="on-path"' in item
    }
    assert {ids["vm1"], ids["net-a"], ids["router"], ids["net-b"], ids["vm2"], "host:h2"} <= on_path
    assert "host:h1" not in on_path
    assert "tunnel" in dom and "megaflow" in dom

    screenshot = tmp_path / "ui-trace.png"
    shot = chromium(tmp_path, url, f"--screenshot={screenshot}")
    assert screenshot.is_file(), shot.stderr[-2000:]
    header = screenshot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (1280, 800)


def test_page_with_a_bad_token_says_so(server: Server, tmp_path: Path) -> None:
    url = f"{server.base}/ui#token=wrong"
    dom = chromium(tmp_path, url, "--dump-dom").stdout
    assert 'id="status" class="error"' in dom and "401" in dom
