"""Traffic probes between lab namespaces, shared by the demo and the end-to-end tests: ping
with RTTs, a checksummed TCP transfer, iperf3, a packet capture inside a VM, a checksummed echo
server/client that reports each peer as the server saw it, a TCP connect probe.

The programs that run inside the namespaces are the modules of `hivenet.lab.traffic`; this
module starts them (through `TrafficProbes.run`/`start_in`, which the lab provides) and reads
their output back. Owns only that; must not touch the kernel, the store or the lab record.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivenet.lab import netns
from hivenet.lab.netns import LabError
from hivenet.lab.plan import VM_INTERFACE
from hivenet.lab.processes import tail


def traffic_program(name: str) -> list[str]:
    """The argv prefix that runs `hivenet.lab.traffic.<name>` with this interpreter."""
    return [sys.executable, "-m", f"hivenet.lab.traffic.{name}"]


def _iperf3_error(output: str) -> str:
    try:
        return str(json.loads(output).get("error") or output.strip()[-300:])
    except (ValueError, AttributeError):
        return output.strip()[-300:]


_PING_REPLY_RE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


@dataclass(frozen=True, slots=True)
class PingResult:
    sent: int
    received: int
    rtts_ms: tuple[float, ...]  # in reply order; the first includes ARP and upcalls
    output: str

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent

    @property
    def first_ms(self) -> float | None:
        return self.rtts_ms[0] if self.rtts_ms else None

    @property
    def steady_p50_ms(self) -> float | None:
        """Median RTT without the first reply (flows installed, ARP cached)."""
        rest = self.rtts_ms[1:]
        return statistics.median(rest) if rest else None


def parse_ping(output: str, sent: int) -> PingResult:
    rtts = tuple(float(match.group(2)) for match in _PING_REPLY_RE.finditer(output))
    summary = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    if summary is not None:
        sent, received = int(summary.group(1)), int(summary.group(2))
    else:
        received = len(rtts)
    return PingResult(sent, received, rtts, output)


@dataclass(frozen=True, slots=True)
class TransferResult:
    bytes_sent: int
    seconds: float
    checksum_ok: bool
    tool: str  # "python" (SHA-256 checked) or "iperf3"
    detail: str = ""

    @property
    def megabits_per_second(self) -> float:
        return self.bytes_sent * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
    return lines


@dataclass(frozen=True, slots=True)
class EchoSession:
    """One connection as the echo server saw it."""

    peer_ip: str
    peer_port: int
    bytes_received: int
    sha256: str


class EchoServer:
    """`hivenet.lab.traffic.echo_server` running in a lab namespace (see `Lab.echo_server`)."""

    def __init__(self, process: netns.NamespaceProcess, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and "ready" in self.log_path.read_text().split():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise LabError(f"echo server did not start: {tail(self.log_path)}")

    def sessions(self, count: int, timeout: float = 10.0) -> list[EchoSession]:
        """The first `count` finished connections (waits for them up to `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = _json_lines(self.log_path)
            if len(lines) >= count:
                return [
                    EchoSession(
                        str(line["peer_ip"]),
                        int(line["peer_port"]),
                        int(line["bytes"]),
                        str(line["sha256"]),
                    )
                    for line in lines[:count]
                ]
            if time.monotonic() > deadline or self.process.poll() not in (None, 0):
                raise LabError(
                    f"echo server: {len(lines)} of {count} connections finished:\n"
                    f"{tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True, slots=True)
class EchoResult:
    local_ip: str
    local_port: int
    bytes_sent: int
    sha256: str
    echoes_match: bool
    longest_wait: float


class EchoClient:
    """`hivenet.lab.traffic.echo_client` running in a lab namespace (see `Lab.echo_client`)."""

    def __init__(self, process: netns.NamespaceProcess, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def progress(self) -> list[tuple[int, float]]:
        """(chunk number, wall-clock time its echo arrived), in order."""
        out: list[tuple[int, float]] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text().splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "progress":
                    out.append((int(words[1]), float(words[2])))
        return out

    def wait_progress(self, chunks: int, timeout: float) -> float:
        """Until `chunks` echoes have arrived; the wall-clock time of the last one."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.progress()
            if len(done) >= chunks:
                return done[-1][1]
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"it exited with {code}" if code is not None else f"after {timeout:.0f} s"
                raise LabError(
                    f"echo client: {len(done)} of {chunks} echoes ({why}):\n{tail(self.log_path)}"
                )
            time.sleep(0.05)

    def result(self, timeout: float) -> EchoResult:
        """Wait for the client to finish; what it sent and whether every echo matched."""
        try:
            code = self.process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabError(
                f"echo client still running after {timeout:.0f} s:\n{tail(self.log_path)}"
            ) from None
        finally:
            self.process.stop()
        lines = _json_lines(self.log_path)
        if code != 0 or not lines:
            raise LabError(f"echo client failed (exit {code}):\n{tail(self.log_path)}")
        line = lines[-1]
        return EchoResult(
            str(line["local_ip"]),
            int(line["local_port"]),
            int(line["bytes"]),
            str(line["sha256"]),
            bool(line["echoes_match"]),
            float(line["longest_wait"]),
        )


class Capture:
    """Frames seen on a VM's eth0 during a time window (see `Lab.capture`)."""

    def __init__(self, process: netns.NamespaceProcess, log_path: Path, seconds: float) -> None:
        self.process = process
        self.log_path = log_path
        self.seconds = seconds

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and "ready" in self.log_path.read_text():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise LabError(f"capture did not start: {tail(self.log_path)}")

    def frames(self) -> list[bytes]:
        """Wait for the window to end; every frame captured."""
        try:
            self.process.popen.wait(self.seconds + 10)
        finally:
            self.process.stop()
        lines = self.log_path.read_text().splitlines()
        if "done" not in lines:
            raise LabError(f"capture did not finish: {tail(self.log_path)}")
        drops = [int(line.split()[1]) for line in lines if line.startswith("drops ")]
        if drops != [0]:
            raise LabError(f"capture on {self.log_path.name} missed frames (drops {drops})")
        frames = (line for line in lines if line not in ("ready", "done"))
        return [bytes.fromhex(line) for line in frames if not line.startswith("drops ")]


class TrafficProbes:
    """The probes, for a class that runs commands in its namespaces (`Lab`): `run` to
    completion, `start_in` in the background with its output in `log_of(name, label)`."""

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def start_in(self, name: str, argv: Sequence[str], *, label: str) -> netns.NamespaceProcess:
        raise NotImplementedError

    def log_of(self, name: str, label: str) -> Path:
        raise NotImplementedError

    def ping(
        self,
        vm: str,
        target: str,
        *,
        count: int = 3,
        interval: float = 0.05,
        wait: float = 1.0,
    ) -> PingResult:
        """`ping` from a VM; never raises for lost replies (look at the result)."""
        argv = ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", f"{wait:g}", target]
        timeout = count * (interval + wait) + 10
        result = self.run(vm, argv, timeout=timeout, check=False)
        return parse_ping(result.stdout + result.stderr, count)

    def tcp_transfer(
        self,
        source: str,
        sink: str,
        sink_ip: str,
        *,
        size: int = 8 << 20,
        port: int = 5201,
        listen_ip: str | None = None,
    ) -> TransferResult:
        """`size` random bytes from `source` to `sink` over TCP; both ends hash them (SHA-256).
        `source` connects to `sink_ip`; `sink` listens on `listen_ip` (default: `sink_ip`;
        another address when `sink_ip` is translated on the way, e.g. a floating IP)."""
        listen = sink_ip if listen_ip is None else listen_ip
        server = self.start_in(
            sink, [*traffic_program("tcp_sink"), listen, str(port)], label="tcpsink"
        )
        try:
            result = self.run(
                source,
                [*traffic_program("tcp_source"), sink_ip, str(port), str(size)],
                timeout=120,
                check=False,
            )
        finally:
            server.stop()
        if result.returncode != 0:
            raise LabError(
                f"TCP transfer {source} -> {sink} ({sink_ip}) failed: {result.stderr.strip()[-500:]}"
            )
        elapsed, sent, received = result.stdout.strip().split("|")
        return TransferResult(size, float(elapsed), sent == received, "python", received)

    def iperf3(
        self, source: str, sink: str, sink_ip: str, *, seconds: float = 2.0
    ) -> TransferResult:
        """An iperf3 TCP run from `source` to `sink`; throughput as the receiver counted it."""
        if shutil.which("iperf3") is None:
            raise LabError("iperf3 is not installed")
        server = self.start_in(
            sink, ["iperf3", "-s", "-1", "-B", sink_ip, "-p", "5202"], label="iperf3"
        )
        error = ""
        try:
            deadline = time.monotonic() + 5.0
            while True:
                result = self.run(
                    source,
                    ["iperf3", "-c", sink_ip, "-p", "5202", "-t", f"{seconds:g}", "-J"],
                    timeout=seconds + 30,
                    check=False,
                )
                try:
                    report = json.loads(result.stdout)
                    received = report["end"]["sum_received"]
                    return TransferResult(
                        int(received["bytes"]), float(received["seconds"]), True, "iperf3"
                    )
                except (ValueError, KeyError, TypeError):
                    error = _iperf3_error(result.stdout + result.stderr)
                # Until the server listens (it has just started), or it gave up.
                if server.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            server.stop()
        raise LabError(f"iperf3 {source} -> {sink_ip}: {error}")

    def echo_server(
        self, name: str, listen_ip: str, port: int, *, connections: int = 1, label: str = "echosrv"
    ) -> EchoServer:
        """An echo server in `name` (a VM or "ext") for `connections` connections; ready when
        this returns. It reports each peer as it saw it: after SNAT, the translated source."""
        server = EchoServer(
            self.start_in(
                name,
                [*traffic_program("echo_server"), listen_ip, str(port), str(connections)],
                label=label,
            ),
            self.log_of(name, label),
        )
        server.wait_ready()
        return server

    def echo_client(
        self,
        name: str,
        target_ip: str,
        port: int,
        *,
        chunk_size: int = 1024,
        chunks: int = 64,
        interval: float = 0.0,
        source_port: int = 0,
        timeout: float = 60.0,
        label: str = "echocli",
    ) -> EchoClient:
        """Start a checksummed echo conversation from `name` to `target_ip:port` (background;
        `.result()` waits). `timeout` bounds each socket call (connect, one echo)."""
        argv = [
            *traffic_program("echo_client"),
            target_ip,
            str(port),
            str(chunk_size),
            str(chunks),
            f"{interval:g}",
            f"{timeout:g}",
            str(source_port),
        ]
        return EchoClient(self.start_in(name, argv, label=label), self.log_of(name, label))

    def tcp_probe(self, name: str, target_ip: str, port: int, *, timeout: float = 2.0) -> str:
        """One TCP connection attempt from `name`: "connected", "refused" or "timeout"."""
        result = self.run(
            name,
            [*traffic_program("tcp_probe"), target_ip, str(port), f"{timeout:g}"],
            timeout=timeout + 15,
            check=False,
        )
        outcome = result.stdout.strip()
        if outcome not in ("connected", "refused", "timeout"):
            raise LabError(f"TCP probe {name} -> {target_ip}:{port}: {result.stderr.strip()}")
        return outcome

    def capture(self, vm: str, seconds: float, *, label: str = "capture") -> Capture:
        """Start capturing every frame on `vm`'s eth0 for `seconds`; `.frames()` waits."""
        process = self.start_in(
            vm, [*traffic_program("capture"), VM_INTERFACE, f"{seconds:g}"], label=label
        )
        capture = Capture(process, self.log_of(vm, label), seconds)
        capture.wait_ready()
        return capture
