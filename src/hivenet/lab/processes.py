"""The lab's processes: started in a session of their own (a lab outlives the terminal that
started it) with a PID file each in the state dir, the way `hivenet.lab.cleanup` reads them;
looked up, waited for and their logs read back.

Owns PID files and process start/stop; must not touch namespaces, links or the lab record.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hivenet.lab import netns
from hivenet.lab.netns import LabError, ProcessRecord

AGENT_LABEL = "agent"
SERVE_LABEL = "serve"
CLI_MODULE = (sys.executable, "-m", "hivenet.cli")


def start_process(
    namespace: str | None,
    record_namespace: str,
    argv: Sequence[str],
    *,
    label: str,
    directory: Path,
    log_path: Path,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start `argv` (inside `namespace`, None: the root namespace) in a session of its own, so
    a lab left running survives the terminal that started it, and write its PID file the way
    `hivenet.lab.cleanup` reads them."""
    pid_file = netns.pid_file_path(record_namespace, label, directory)
    if pid_file.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if ProcessRecord.from_json(pid_file.read_text()).is_running():
                raise LabError(f"{label} in {record_namespace} is already running ({pid_file})")
        pid_file.unlink(missing_ok=True)
    full = list(argv) if namespace is None else ["ip", "netns", "exec", namespace, *argv]
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    record = ProcessRecord(
        popen.pid, netns.read_start_time(popen.pid) or 0, record_namespace, label, tuple(argv)
    )
    temporary = pid_file.with_suffix(".tmp")
    temporary.write_text(record.to_json())
    temporary.replace(pid_file)
    return popen, record


def read_record(pid_file: Path) -> ProcessRecord | None:
    try:
        return ProcessRecord.from_json(pid_file.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_gone(record: ProcessRecord, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not record.is_running():
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)
        time.sleep(0.02)
    return False


def namespace_pids(namespace: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
