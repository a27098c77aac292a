"""`python -m hivenet.demo` (what `make demo` runs): HiveNet on the embedded store, as a tutorial.

Owns the demo script only: it starts `hivenet serve` as a child process on a free 127.0.0.1
port with a fresh state dir under ./var/demo, waits for /v1/health, then builds a sample
two-tenant topology by running `hivenet ...` commands (each echoed like a tutorial), prints
the resulting tables, shows one rejected input, says how to explore further, and stops the
server by its PID (also on Ctrl-C, SIGTERM or error). It talks to HiveNet only through the
CLI (and the health endpoint); it must not import the server or the store.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

from hivenet.api.client import ApiClientError, HivenetClient

DEMO_ROOT = Path("var") / "demo"
HEALTH_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 5.0
CLI = (sys.executable, "-m", "hivenet.cli")


class DemoError(Exception):
    """A step of the demo did not do what the tutorial says it does."""


class Stopped(Exception):
    """SIGTERM arrived: unwind so the server gets stopped."""


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class DemoServer:
    """`hivenet serve` in a child process of its own session, stopped by PID."""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.state_dir = state_dir
        self.port = port
        self.api_url = f"http://127.0.0.1:{port}"
        self.log_path = state_dir / "serve.log"
        self.pid_path = state_dir / "serve.pid"
        self.token_path = state_dir / "admin-token"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return ["serve", "--port", str(self.port), "--state-dir", str(self.state_dir)]

    def start(self) -> int:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*CLI, *self.command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops the server
            )
        self.pid_path.write_text(f"{self.process.pid}\n")
        return self.process.pid

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT_SECONDS) -> int:
        """Poll /v1/health until it answers; return the store revision it reports."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        with HivenetClient(self.api_url, timeout=1.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise DemoError(
                        f"hivenet serve exited with code {self.process.returncode}:\n{self.log_tail()}"
                    )
                try:
                    health = client.health()
                except ApiClientError:
                    health = None
                if health is not None and health.get("status") == "ok" and self.token_path.exists():
                    return int(health.get("revision", 0))
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"hivenet serve did not become healthy within {timeout:.0f} s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period; return the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.pid_path.unlink(missing_ok=True)
        return self.process.returncode


class Tutorial:
    """Runs `hivenet ...` in child processes, echoing each command and its output."""

    def __init__(self, env: dict[str, str], out: TextIO) -> None:
        self.env = env
        self.out = out
        self.commands_run = 0

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def section(self, title: str) -> None:
        self.say()
        self.say(f"== {title}")

    def hivenet(self, *args: str, expect_exit: int = 0) -> str:
        self.say(f"$ {shlex.join(['hivenet', *args])}")
        result = subprocess.run(
            [*CLI, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        self.commands_run += 1
        if result.stdout:
            self.out.write(result.stdout)
        if result.stderr:
            self.out.write(result.stderr)
        self.out.flush()
        if result.returncode != expect_exit:
            raise DemoError(
                f"`hivenet {shlex.join(args)}` exited with {result.returncode}, "
                f"expected {expect_exit}"
            )
        return result.stderr if expect_exit else result.stdout


def build_sample_topology(tutorial: Tutorial) -> None:
    run = tutorial.hivenet

    tutorial.section("Hosts (hypervisors) and the tunnel zone that connects them over VXLAN")
    run("host", "create", "--id", "host-1", "--name", "hypervisor-1", "-q")
    run("host", "create", "--id", "host-2", "--name", "hypervisor-2", "-q")
    run(
        "tunnel-zone", "create", "--id", "underlay", "--name", "underlay",
        "--member", "host-1=192.168.100.1", "--member", "host-2=192.168.100.2", "-q",
    )  # fmt: skip

    tutorial.section("A provider router and one network per tenant (blue, green)")
    run("router", "create", "--id", "edge-router", "--name", "edge-router")
    run("bridge", "create", "--id", "blue-net", "--name", "blue-net", "--tenant-id", "blue", "-q")
    run(
        "bridge", "create", "--id", "green-net", "--name", "green-net", "--tenant-id", "green", "-q"
    )

    tutorial.section("Router ports (the subnets' gateways) peered to the bridges' uplink ports")
    for tenant, subnet_octet in (("blue", 1), ("green", 2)):
        run(
            "port", "create", "--id", f"{tenant}-uplink", "--name", f"{tenant}-uplink",
            "--tenant-id", tenant, "--device-kind", "bridge", "--device-id", f"{tenant}-net", "-q",
        )  # fmt: skip
        run(
            "port", "create", "--id", f"edge-{tenant}", "--name", f"edge-to-{tenant}",
            "--device-kind", "router", "--device-id", "edge-router",
            "--address", f"10.0.{subnet_octet}.1/24", "--peer-id", f"{tenant}-uplink", "-q",
        )  # fmt: skip

    tutorial.section("Four VM ports, bound to interfaces on the two hosts")
    for tenant, subnet_octet in (("blue", 1), ("green", 2)):
        for vm in (1, 2):
            host = f"host-{vm}"
            extra = ("--json",) if (tenant, vm) == ("blue", 1) else ("-q",)
            run(
                "port", "create", "--id", f"{tenant}-vm{vm}", "--name", f"{tenant}-vm{vm}",
                "--tenant-id", tenant, "--device-kind", "bridge", "--device-id", f"{tenant}-net",
                "--mac", f"02:00:00:00:{subnet_octet:02x}:{10 + vm:02x}",
                "--address", f"10.0.{subnet_octet}.{10 + vm}/24",
                "--host-id", host, "--interface", f"hn{tenant[0]}vm{vm}", *extra,
            )  # fmt: skip

    tutorial.section("Routes: each subnet out of its router port; the rest of 10/8 rejected")
    run("route", "create", "--router-id", "edge-router", "--dst", "10.0.1.0/24",
        "--next-hop-port", "edge-blue", "-q")  # fmt: skip
    run("route", "create", "--router-id", "edge-router", "--dst", "10.0.2.0/24",
        "--next-hop-port", "edge-green", "-q")  # fmt: skip
    run("route", "create", "--router-id", "edge-router", "--dst", "10.0.0.0/8",
        "--type", "reject", "--weight", "200", "-q")  # fmt: skip

    tutorial.section("A chain for green-net: replies pass, blue may reach green only on SSH")
    run("chain", "create", "--id", "green-inbound", "--name", "green-inbound",
        "--tenant-id", "green", "-q")  # fmt: skip
    run("rule", "create", "--chain-id", "green-inbound", "--position", "10",
        "--action", "accept", "--set", "match_return_flow=true", "-q")  # fmt: skip
    run("rule", "create", "--chain-id", "green-inbound", "--position", "20",
        "--action", "accept", "--nw-src", "10.0.1.0/24", "--nw-proto", "6", "--tp-dst", "22",
        "-q")  # fmt: skip
    run("rule", "create", "--chain-id", "green-inbound", "--position", "30",
        "--action", "drop", "--nw-src", "10.0.1.0/24", "-q")  # fmt: skip
    run("bridge", "update", "green-net", "--inbound-chain-id", "green-inbound")


def show_tables(tutorial: Tutorial) -> None:
    tutorial.section("The resulting topology")
    for kind in ("host", "tunnel-zone", "router", "bridge", "port"):
        tutorial.hivenet(kind, "list")
    tutorial.hivenet("route", "list", "--router-id", "edge-router")
    tutorial.hivenet("rule", "list", "--chain-id", "green-inbound")
    tutorial.hivenet("port", "show", "edge-blue")


def show_rejected_input(tutorial: Tutorial) -> None:
    tutorial.section("Bad input is refused with the field and the value (exit code 1)")
    errors = tutorial.hivenet(
        "port", "create", "--device-kind", "bridge", "--device-id", "blue-net",
        "--mac", "02:00:00:zz:00:01", expect_exit=1,
    )  # fmt: skip
    if "mac" not in errors:
        raise DemoError(f"the error for a bad MAC does not name the field: {errors!r}")


def explain_next_steps(tutorial: Tutorial, server: DemoServer) -> None:
    state_dir = server.state_dir.resolve()
    tutorial.section("Explore")
    tutorial.say(f"API URL:     {server.api_url}  (OpenAPI docs at {server.api_url}/docs)")
    tutorial.say(f"token file:  {server.token_path.resolve()}")
    tutorial.say(f"server log:  {server.log_path.resolve()}")
    tutorial.say("The demo server stops now. To start it again on the same data and look around:")
    tutorial.say(f"  hivenet serve --state-dir {state_dir} --port {server.port} &")
    tutorial.say(f"  export HIVENET_API_URL={server.api_url} HIVENET_STATE_DIR={state_dir}")
    tutorial.say("  hivenet config show        # where the URL and token come from")
    tutorial.say("  hivenet bridge list")
    tutorial.say("  hivenet port show blue-vm1 --json")
    tutorial.say("  hivenet --help             # every kind: create, list, show, update, delete")


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def run_demo(out: TextIO = sys.stdout, demo_root: Path = DEMO_ROOT) -> int:
    started = time.monotonic()
    demo_root.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=demo_root))
    server = DemoServer(state_dir, free_local_port())
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_stopped)
    tutorial = Tutorial({}, out)
    try:
        tutorial.say("HiveNet demo: the embedded store and the REST API, driven by the CLI.")
        tutorial.say(f"$ {shlex.join(['hivenet', *server.command])} &")
        pid = server.start()
        tutorial.say(f"server PID {pid}, state dir {state_dir}")
        server.wait_healthy()
        tutorial.say(f"server healthy at {server.api_url}/v1/health")
        token = server.token_path.read_text().strip()
        tutorial.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HIVENET_")},
            "HIVENET_API_URL": server.api_url,
            "HIVENET_TOKEN": token,
        }
        tutorial.say(f"$ export HIVENET_API_URL={server.api_url}")
        tutorial.say(f'$ export HIVENET_TOKEN="$(cat {server.token_path})"')
        build_sample_topology(tutorial)
        show_tables(tutorial)
        show_rejected_input(tutorial)
        explain_next_steps(tutorial, server)
        return_code = 0
    except DemoError as exc:
        tutorial.say(f"\ndemo failed: {exc}")
        return_code = 1
    except (KeyboardInterrupt, Stopped):
        tutorial.say("\ndemo interrupted")
        return_code = 130
    finally:
        exit_code = server.stop()
        signal.signal(signal.SIGTERM, previous_sigterm)
        if exit_code is not None and server.process is not None:
            how = (
                f"by {signal.Signals(-exit_code).name}"
                if exit_code < 0
                else f"exit code {exit_code}"
            )
            tutorial.say(f"\nstopped server PID {server.process.pid} ({how})")
    elapsed = time.monotonic() - started
    tutorial.say(f"demo {'done' if return_code == 0 else 'ended'}: {tutorial.commands_run} "
                 f"hivenet commands in {elapsed:.1f} s")  # fmt: skip
    return return_code


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # no options yet; later versions run the full lab
    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
