"""Local etcd clusters for the lab and the tests: start, kill, restart and stop members by PID.

Owns: the etcd member processes this module starts and, under `<state_dir>/etcd/`, their data
directories (`hn-etcdN.data/`), logs (`hn-etcdN.log`), PID records (`hn-etcdN.json`) and the
cluster's description (`cluster.json`: names, ports, token, timing), from which another process
reattaches with `EtcdCluster.load(state_dir)` (`hivenet lab status`, a test killing the leader).
Members are named `hn-etcd1..N`; peers talk on 127.0.0.1, clients reach them on `client_host`
(127.0.0.1 by default; the lab passes the address it gave its root underlay bridge, so agents in
host namespaces reach them), on ports picked free at start. `stop_all(state_dir)` (called by
`hivenet lab down|clean`) ends every recorded member and removes what the cluster left on disk.

Must not touch: any etcd it did not start, a system etcd on port 2379 included. Ports are never
the defaults, the child's environment drops every `ETCD_*` variable (etcd reads its flags from
them), each cluster gets its own random `--initial-cluster-token`, and a PID is signalled only
while its start time and command line still match the record (a reused PID is left alone).

Owner: a cluster started with `die_with_owner=True` (the tests, the benchmarks) lives no longer
than the process that started it: each member gets the parent-death signal SIGKILL, so it dies
with its owner also when that owner is killed by a signal (a `timeout` around pytest, SIGKILL)
and no finalizer runs. The kernel sends that signal when the *thread* that forked the member
ends, so members are forked by one thread of this module that lives as long as the process.
`cluster.json` records the owner (PID and start time); `clean_stale_clusters()` (run by
`hivenet lab clean`) ends the members and removes the `hn-etcd-*` directories of clusters whose
owner is gone. The lab's own cluster has no owner (it outlives `hivenet lab up`) and is ended
by `hivenet lab down|clean` through its records.

Security (`secure=True`, the default): clients speak TLS to the members and must present a
certificate signed by the cluster's own CA (`--client-cert-auth`), and etcd authentication is
on. `start_cluster` makes the CA and certificates with `lab/pki.py` into `<etcd dir>/tls/`
(removed with the directory): a server certificate for 127.0.0.1 and `client_host`, a client
certificate with common name `root` (etcd's admin: a request without a token is root's by its
certificate, so the lab and the tests administer the cluster with it and no password) and one
with common name `hivenet`. Before enabling auth it adds the users `root` (a random password
nobody keeps) and `hivenet` (a random password in `tls/hivenet.password`, 0600) with a role
`hivenet` that may read and write every key (the cluster is HiveNet's alone; the store reads
the whole key space for its revision). `url` names the `hivenet` user with its password file,
so the store exercises the token path (Authenticate, renewal on expiry); `admin_url` is root's
certificate-only URL. Peer traffic stays plaintext on 127.0.0.1. The random passwords need
no slow hash: etcd runs with `--bcrypt-cost 4`, so each Authenticate stays cheap.

Timing: heartbeat 50 ms and election timeout 500 ms (etcd's defaults are 100/1000) so a killed
leader is replaced within about a second, and etcd's minimum lease TTL is 1 s (it is
1.5 x election timeout, rounded up), which a 1-second lease test needs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import grpc
from aetcd import rpc

from hivenet.lab.pki import new_ca

if TYPE_CHECKING:
    from hivenet.store.etcd import EtcdStore

__all__ = [
    "DEFAULT_ETCD_BINARY",
    "MEMBER_PREFIX",
    "EtcdCluster",
    "EtcdLabError",
    "EtcdMember",
    "EtcdMemberStatus",
    "clean_stale_clusters",
    "start_cluster",
    "stop_all",
]

DEFAULT_ETCD_BINARY: Final = Path("/usr/bin/etcd")
MEMBER_PREFIX: Final = "hn-etcd"
ETCD_SUBDIR: Final = "etcd"
CLUSTER_FILE: Final = "cluster.json"
HOST: Final = "127.0.0.1"  # peers always; clients unless `client_host` says otherwise
# Where throwaway clusters (tests, benchmarks) keep their `hn-etcd-*` directories.
THROWAWAY_ROOTS: Final = (Path("/dev/shm"), Path(tempfile.gettempdir()))
THROWAWAY_PREFIX: Final = "hn-etcd-"
# A throwaway directory with no owner on record is stale only when older than this (it may be
# a cluster being started right now).
_UNRECORDED_GRACE_SECONDS: Final = 60.0
SETPRIV: Final = "/usr/bin/setpriv"
_EXEC_TIMEOUT: Final = 5.0
_START_ATTEMPTS: Final = 3  # a picked port may be taken by someone else before etcd binds it
_HTTP_TIMEOUT: Final = 1.0
TLS_SUBDIR: Final = "tls"
STORE_USER: Final = "hivenet"
ADMIN_USER: Final = "root"  # etcd's built-in admin user and role
_BCRYPT_COST: Final = "4"  # etcd's minimum: the lab's passwords are random, not guessable
_ADMIN_TIMEOUT: Final = 5.0


class EtcdLabError(RuntimeError):
    """An etcd cluster could not be started or stopped; the message names the member."""


@dataclass(frozen=True, slots=True)
class EtcdMember:
    """One member's name, ports and files (the process itself is tracked by `EtcdCluster`)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_file: Path
    record_file: Path
    client_host: str = HOST

    secure: bool = False

    @property
    def client_url(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.client_host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """`host:port` of the client API, as an `etcd://` store URL lists it."""
        return f"{self.client_host}:{self.client_port}"


@dataclass(frozen=True, slots=True)
class EtcdMemberStatus:
    """One member as `hivenet lab status` shows it."""

    name: str
    endpoint: str
    pid: int | None  # None: not running
    healthy: bool  # answers /health and sees a leader
    is_leader: bool


@dataclass(frozen=True, slots=True)
class _ProcessRecord:
    """What a PID record says about a member process this module started."""

    name: str
    pid: int
    start_time: int
    argv: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "pid": self.pid,
                "start_time": self.start_time,
                "argv": list(self.argv),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> _ProcessRecord:
        data = json.loads(text)
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            argv=tuple(str(part) for part in data["argv"]),
        )

    def is_running(self) -> bool:
        """True only while the PID is still the process we started (same start time and argv)."""
        return (
            _read_start_time(self.pid) == self.start_time
            and _read_cmdline(self.pid) == list(self.argv)
            and not _is_zombie(self.pid)
        )


def _read_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: with the PID it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return int(stat.rpartition(")")[2].split()[19])


def _read_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return True
    return state in ("Z", "X")


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _process_identity(pid: int) -> dict[str, int] | None:
    """PID and start time: what names a live process for good (None if it is gone)."""
    start_time = _read_start_time(pid)
    return None if start_time is None else {"pid": pid, "start_time": start_time}


def _owner_is_alive(owner: object) -> bool:
    if not isinstance(owner, dict):
        return False
    try:
        pid, start_time = int(owner["pid"]), int(owner["start_time"])
    except (KeyError, TypeError, ValueError):
        return False
    return _read_start_time(pid) == start_time and not _is_zombie(pid)


# The parent-death signal follows the thread that forked the child: members that must die with
# their owner are forked by this one thread, which lives as long as the process. `setpriv`
# (util-linux) arms the signal and then execs etcd, so the PID and the command line we record
# are etcd's (no Python code runs between fork and exec, which gRPC's fork handlers dislike).
_spawner_lock = threading.Lock()
_spawner: concurrent.futures.ThreadPoolExecutor | None = None


def _spawn_dying_with_owner(argv: list[str], **popen_options: Any) -> subprocess.Popen[bytes]:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="hn-etcd-spawner"
            )

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([SETPRIV, "--pdeathsig", "KILL", "--", *argv], **popen_options)

    process = _spawner.submit(spawn).result()
    deadline = time.monotonic() + _EXEC_TIMEOUT
    while _read_cmdline(process.pid) != argv and process.poll() is None:
        if time.monotonic() > deadline:
            raise EtcdLabError(f"{SETPRIV} did not start {argv[0]} within {_EXEC_TIMEOUT:g}s")
        time.sleep(0.002)
    return process


def _signal_and_wait(record: _ProcessRecord, signum: int, timeout: float) -> bool:
    """Send `signum` if the record still names a live process; True once it is gone."""
    if not record.is_running():
        _reap(record.pid)
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signum)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not record.is_running():
            return True
        time.sleep(0.01)
    return False


def _end_process(record: _ProcessRecord, *, timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL; True if the process is gone."""
    if _signal_and_wait(record, signal.SIGTERM, timeout):
        return True
    return _signal_and_wait(record, signal.SIGKILL, timeout)


def _free_ports(hosts: list[str]) -> list[int]:
    """One port per entry of `hosts`, each free on its address a moment ago, all distinct (held
    at once, so none repeats)."""
    sockets: list[socket.socket] = []
    try:
        for host in hosts:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_client_host(client_host: object) -> str:
    """`client_host` as etcd's URLs want it: one IPv4 address (no name, no port)."""
    if not isinstance(client_host, str):
        raise EtcdLabError(f"client_host must be an IPv4 address string, got {client_host!r}")
    try:
        return str(ipaddress.IPv4Address(client_host))
    except ValueError:
        raise EtcdLabError(
            f"client_host {client_host!r}: not an IPv4 address (e.g. 127.0.0.1)"
        ) from None


def _child_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("ETCD_")}


# Never through an HTTP proxy from the environment: the members live on this machine.
_DIRECT_HTTP: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str] | None:
    opener = _DIRECT_HTTP
    if context is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    try:
        with opener.open(url, timeout=_HTTP_TIMEOUT) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (OSError, ValueError):
        return None


class EtcdCluster:
    """A running local etcd cluster started by `start_cluster`; every process known by PID.

    Use as a context manager (or call `stop()`) so the members end also when a test fails.
    """

    def __init__(
        self,
        directory: Path,
        members: list[EtcdMember],
        *,
        token: str,
        binary: Path,
        heartbeat_ms: int,
        election_ms: int,
        die_with_owner: bool = False,
        secure: bool = False,
        auth_token_ttl: int | None = None,
    ) -> None:
        self.directory = directory
        self.members = members
        self.token = token
        self.secure = secure
        self.auth_token_ttl = auth_token_ttl
        self._binary = binary
        self._heartbeat_ms = heartbeat_ms
        self._election_ms = election_ms
        self.die_with_owner = die_with_owner
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._records: dict[str, _ProcessRecord] = {}

    def __repr__(self) -> str:
        return f"EtcdCluster({self.url!r}, directory={str(self.directory)!r})"

    @classmethod
    def load(cls, state_dir: Path, *, binary: Path | None = None) -> EtcdCluster:
        """The cluster `start_cluster(state_dir)` started, possibly in another process: its
        members, and the PIDs of those whose record still names a live process."""
        directory = Path(state_dir) / ETCD_SUBDIR
        path = directory / CLUSTER_FILE
        try:
            data = json.loads(path.read_text())
            client_host = check_client_host(data.get("client_host", HOST))
            secure = bool(data.get("secure", False))
            ttl = data.get("auth_token_ttl")
            members = [
                _member(
                    directory,
                    str(entry["name"]),
                    int(entry["client_port"]),
                    int(entry["peer_port"]),
                    client_host,
                    secure,
                )
                for entry in data["members"]
            ]
            cluster = cls(
                directory,
                members,
                token=str(data["token"]),
                binary=Path(binary if binary is not None else data["binary"]),
                heartbeat_ms=int(data["heartbeat_ms"]),
                election_ms=int(data["election_ms"]),
                secure=secure,
                auth_token_ttl=None if ttl is None else int(ttl),
            )
        except FileNotFoundError:
            raise EtcdLabError(f"no etcd cluster recorded under {str(directory)!r}") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise EtcdLabError(f"{path}: not an etcd cluster description ({error!r})") from None
        for member in members:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                record = _ProcessRecord.from_json(member.record_file.read_text())
                if record.name == member.name and record.is_running():
                    cluster._records[member.name] = record
        return cluster

    def _save_description(self) -> None:
        client_hosts = {member.client_host for member in self.members}
        description = {
            "token": self.token,
            "binary": str(self._binary),
            "heartbeat_ms": self._heartbeat_ms,
            "election_ms": self._election_ms,
            # The process the members die with (None: they outlive whoever started them).
            "owner": _process_identity(os.getpid()) if self.die_with_owner else None,
            "client_host": client_hosts.pop() if len(client_hosts) == 1 else HOST,
            "secure": self.secure,
            "auth_token_ttl": self.auth_token_ttl,
            "members": [
                {"name": m.name, "client_port": m.client_port, "peer_port": m.peer_port}
                for m in self.members
            ],
        }
        path = self.directory / CLUSTER_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(description, indent=1, sort_keys=True))
        temporary.replace(path)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- names

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    @property
    def url(self) -> str:
        """The store URL naming every member: `etcd://127.0.0.1:p1,127.0.0.1:p2,...`; when
        secure `etcds://...?cacert=...` with the `hivenet` user's certificate and password file."""
        if not self.secure:
            return "etcd://" + ",".join(self.endpoints)
        return self._tls_url(STORE_USER, self.password_file)

    @property
    def admin_url(self) -> str:
        """A store URL as etcd's root (by its client certificate, no password): to wipe or
        inspect the cluster. The same as `url` when the cluster is not secure."""
        return self._tls_url(ADMIN_USER) if self.secure else self.url

    def _tls_url(self, user: str, password_file: Path | None = None) -> str:
        cert, key = self.client_cert(user)
        options = {"cacert": self.ca_file, "cert": cert, "key": key}
        query = "&".join(f"{name}={quote(str(path), safe='/')}" for name, path in options.items())
        if password_file is not None:
            query += f"&user={user}&password_file={quote(str(password_file), safe='/')}"
        return "etcds://" + ",".join(self.endpoints) + "?" + query

    def store(self, endpoints: list[str] | None = None, **options: Any) -> EtcdStore:
        """An `EtcdStore` on `endpoints` (default: every member, in order) with this cluster's
        TLS files and `hivenet` credentials (those of `url`); `options` go to `EtcdStore`."""
        from hivenet.store.etcd import EtcdStore
        from hivenet.store.etcd_url import parse_etcd_url

        parsed = parse_etcd_url(self.url)
        chosen = list(parsed.endpoints) if endpoints is None else endpoints
        return EtcdStore(chosen, tls=parsed.tls, auth=parsed.auth, **options)

    # -- TLS files (secure clusters)

    @property
    def tls_dir(self) -> Path:
        return self.directory / TLS_SUBDIR

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def password_file(self) -> Path:
        """The `hivenet` user's password (one line, 0600)."""
        return self.tls_dir / f"{STORE_USER}.password"

    def client_cert(self, user: str) -> tuple[Path, Path]:
        """(certificate, key) of the client certificate whose common name is `user`."""
        return self.tls_dir / f"{user}.pem", self.tls_dir / f"{user}-key.pem"

    def _make_tls_files(self) -> None:
        ca = new_ca(f"hivenet lab etcd CA {self.token}")
        self.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca.write_cert(self.ca_file)
        names = tuple(dict.fromkeys([HOST, *(member.client_host for member in self.members)]))
        ca.issue_server(self.tls_dir, "server", names)
        for user in (ADMIN_USER, STORE_USER):
            ca.issue_client(self.tls_dir, user, user)
        self.password_file.touch(mode=0o600)
        self.password_file.write_text(secrets.token_urlsafe(24) + "\n")

    def _ssl_context(self) -> ssl.SSLContext | None:
        """For /health and /metrics: verify the member, present root's certificate."""
        if not self.secure:
            return None
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(*map(str, self.client_cert(ADMIN_USER)))
        return context

    def admin_channel(self, member: EtcdMember) -> grpc.Channel:
        """A blocking gRPC channel to `member` as root (its certificate; plaintext when the
        cluster is not secure). The caller closes it."""
        if not self.secure:
            return grpc.insecure_channel(member.endpoint)
        cert, key = self.client_cert(ADMIN_USER)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=cert.read_bytes(),
        )
        return grpc.secure_channel(member.endpoint, credentials)

    def _enable_auth(self) -> None:
        """Add root and the `hivenet` user and role, then turn etcd authentication on."""
        member = self.members[0]
        channel = self.admin_channel(member)
        every_key = rpc.Permission(permType=rpc.Permission.READWRITE, key=b"\0", range_end=b"\0")
        steps: list[tuple[str, Any]] = [
            ("UserAdd", rpc.AuthUserAddRequest(name=ADMIN_USER, password=secrets.token_hex(16))),
            ("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=ADMIN_USER, role=ADMIN_USER)),
            ("RoleAdd", rpc.AuthRoleAddRequest(name=STORE_USER)),
            (
                "RoleGrantPermission",
                rpc.AuthRoleGrantPermissionRequest(name=STORE_USER, perm=every_key),
            ),
            (
                "UserAdd",
                rpc.AuthUserAddRequest(
                    name=STORE_USER, password=self.password_file.read_text().rstrip("\n")
                ),
            ),
            ("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=STORE_USER, role=STORE_USER)),
            ("AuthEnable", rpc.AuthEnableRequest()),
        ]
        try:
            auth = rpc.AuthStub(channel)
            for method, request in steps:
                try:
                    getattr(auth, method)(request, timeout=_ADMIN_TIMEOUT)
                except grpc.RpcError as error:
                    raise EtcdLabError(
                        f"enabling etcd auth through {member.name} ({member.endpoint}): "
                        f"{method} failed: {error.details()}"
                    ) from None
        finally:
            channel.close()

    def member(self, name: str) -> EtcdMember:
        for member in self.members:
            if member.name == name:
                return member
        raise EtcdLabError(f"member {name!r}: no such member (have {self.names()})")

    def names(self) -> list[str]:
        return [member.name for member in self.members]

    def pid(self, name: str) -> int | None:
        record = self._records.get(self.member(name).name)
        return record.pid if record is not None and record.is_running() else None

    def is_running(self, name: str) -> bool:
        return self.pid(name) is not None

    # -- processes

    def _argv(self, member: EtcdMember) -> list[str]:
        initial_cluster = ",".join(f"{other.name}={other.peer_url}" for other in self.members)
        return [
            str(self._binary),
            "--name",
            member.name,
            "--data-dir",
            str(member.data_dir),
            "--listen-client-urls",
            member.client_url,
            "--advertise-client-urls",
            member.client_url,
            "--listen-peer-urls",
            member.peer_url,
            "--initial-advertise-peer-urls",
            member.peer_url,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            "new",  # ignored when the data dir already holds a member (a restart)
            "--initial-cluster-token",
            self.token,
            "--heartbeat-interval",
            str(self._heartbeat_ms),
            "--election-timeout",
            str(self._election_ms),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--log-level",
            "warn",
            *self._security_arguments(),
        ]

    def _security_arguments(self) -> list[str]:
        if not self.secure:
            return []
        arguments = [
            "--cert-file",
            str(self.tls_dir / "server.pem"),
            "--key-file",
            str(self.tls_dir / "server-key.pem"),
            "--trusted-ca-file",
            str(self.ca_file),
            "--client-cert-auth",
            "--bcrypt-cost",
            _BCRYPT_COST,
        ]
        if self.auth_token_ttl is not None:
            arguments += ["--auth-token-ttl", str(self.auth_token_ttl)]
        return arguments

    def _launch(self, member: EtcdMember) -> None:
        if self.is_running(member.name):
            raise EtcdLabError(
                f"member {member.name!r} is already running (pid {self.pid(member.name)})"
            )
        argv = self._argv(member)
        with member.log_file.open("ab") as log:
            options: dict[str, Any] = {
                "stdin": subprocess.DEVNULL,
                "stdout": log,
                "stderr": subprocess.STDOUT,
                "env": _child_environment(),
                "start_new_session": True,  # a terminal's Ctrl-C goes to the lab, which stops us
            }
            if self.die_with_owner:
                process = _spawn_dying_with_owner(argv, **options)
            else:
                process = subprocess.Popen(argv, **options)
        record = _ProcessRecord(
            member.name, process.pid, _read_start_time(process.pid) or 0, tuple(argv)
        )
        temporary = member.record_file.with_suffix(".tmp")
        temporary.write_text(record.to_json())
        temporary.replace(member.record_file)
        self._processes[member.name] = process
        self._records[member.name] = record

    def start_member(self, name: str) -> None:
        """Start (or restart, on its existing data dir and ports) member `name`; no wait."""
        self._launch(self.member(name))

    def kill(self, name: str) -> int:
        """SIGKILL member `name` by PID (a crash: no goodbye to its peers); returns the PID."""
        member = self.member(name)
        record = self._records.get(member.name)
        if record is None or not record.is_running():
            raise EtcdLabError(f"member {name!r} is not running")
        if not _signal_and_wait(record, signal.SIGKILL, 5.0):
            raise EtcdLabError(f"member {name!r} (pid {record.pid}) survived SIGKILL")
        self._forget(member)
        return record.pid

    def kill_all(self) -> list[int]:
        """SIGKILL every running member (the whole store crashes at once); their PIDs."""
        running = [member.name for member in self.members if self.is_running(member.name)]
        return [self.kill(name) for name in running]

    def stop_member(self, name: str) -> None:
        """End member `name` cleanly (SIGTERM, SIGKILL after 5 s)."""
        member = self.member(name)
        record = self._records.get(member.name)
        if record is not None and not _end_process(record):
            raise EtcdLabError(f"member {name!r} (pid {record.pid}) survived SIGKILL")
        self._forget(member)

    def _forget(self, member: EtcdMember) -> None:
        process = self._processes.pop(member.name, None)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1.0)
        self._records.pop(member.name, None)
        member.record_file.unlink(missing_ok=True)

    def stop(self, *, remove_data: bool = True, graceful: bool = True) -> None:
        """End every member (by PID) and, by default, delete the cluster's directory.

        Graceful: SIGTERM one member after the other (SIGTERM to all at once makes each wait
        ~5 s for peers that are going away too). Not graceful: SIGKILL, for throwaway clusters
        whose data is deleted anyway.
        """
        if not graceful:
            for member in self.members:
                if self.is_running(member.name):
                    self.kill(member.name)
        failures = []
        for member in self.members:
            try:
                self.stop_member(member.name)
            except EtcdLabError as error:
                failures.append(str(error))
        if remove_data and not failures:
            shutil.rmtree(self.directory, ignore_errors=True)
        if failures:
            raise EtcdLabError("; ".join(failures))

    # -- health

    def member_is_healthy(self, name: str) -> bool:
        """The member answers and sees a leader (etcd's own /health check)."""
        member = self.member(name)
        if not self.is_running(name):
            return False
        answer = _http_get(f"{member.client_url}/health", self._ssl_context())
        if answer is None or answer[0] != 200:
            return False
        with contextlib.suppress(ValueError):
            return bool(json.loads(answer[1]).get("health") == "true")
        return False

    def wait_healthy(self, timeout: float = 20.0, *, names: list[str] | None = None) -> None:
        """Wait until every running member (or those in `names`) is healthy."""
        wanted = (
            names
            if names is not None
            else [m.name for m in self.members if self.is_running(m.name)]
        )
        deadline = time.monotonic() + timeout
        while True:
            exited = [
                name
                for name in wanted
                if (process := self._processes.get(name)) is not None and process.poll() is not None
            ]
            if exited:
                raise EtcdLabError(
                    f"member(s) {exited} exited during start; see {self.directory}/*.log: "
                    + self.log_tail(exited[0])
                )
            if all(self.member_is_healthy(name) for name in wanted):
                return
            if time.monotonic() > deadline:
                unhealthy = [name for name in wanted if not self.member_is_healthy(name)]
                raise EtcdLabError(f"member(s) {unhealthy} not healthy after {timeout}s")
            time.sleep(0.05)

    def member_is_leader(self, name: str) -> bool:
        """Member `name` runs and says it is the raft leader (its /metrics)."""
        member = self.member(name)
        if not self.is_running(name):
            return False
        answer = _http_get(f"{member.client_url}/metrics", self._ssl_context())
        return answer is not None and "\netcd_server_is_leader 1\n" in answer[1]

    def leader(self, timeout: float = 10.0) -> EtcdMember:
        """The member that is raft leader now (from each running member's /metrics)."""
        deadline = time.monotonic() + timeout
        while True:
            for member in self.members:
                if self.member_is_leader(member.name):
                    return member
            if time.monotonic() > deadline:
                raise EtcdLabError(f"no leader among {self.names()} after {timeout}s")
            time.sleep(0.05)

    def member_statuses(self) -> list[EtcdMemberStatus]:
        """PID, health and leadership of every member, asked now (about 1 s per silent one)."""
        return [
            EtcdMemberStatus(
                name=member.name,
                endpoint=member.endpoint,
                pid=self.pid(member.name),
                healthy=self.member_is_healthy(member.name),
                is_leader=self.member_is_leader(member.name),
            )
            for member in self.members
        ]

    def describe(self) -> dict[str, Any]:
        """URL and, per member, PID (None when down) and client endpoint: for `lab status`."""
        return {
            "url": self.url,
            "members": {
                member.name: {"pid": self.pid(member.name), "client": member.endpoint}
                for member in self.members
            },
        }

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = self.member(name).log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_cluster(
    state_dir: Path,
    *,
    size: int = 3,
    binary: Path = DEFAULT_ETCD_BINARY,
    heartbeat_ms: int = 50,
    election_ms: int = 500,
    timeout: float = 30.0,
    client_host: str = HOST,
    die_with_owner: bool = False,
    secure: bool = True,
    auth_token_ttl: int | None = None,
) -> EtcdCluster:
    """Start a `size`-member cluster with its files under `state_dir/etcd/`; wait until healthy.

    Clients reach the members on `client_host` (an IPv4 address of this machine's root
    namespace); the members talk to each other on 127.0.0.1.

    `secure` (the default): TLS with client certificates and etcd authentication (see the
    module docstring); `auth_token_ttl` is etcd's `--auth-token-ttl` (seconds; etcd's default
    300 when None). Without `secure`, plaintext and no authentication.

    With `die_with_owner` every member (also one restarted later through this object) gets
    SIGKILL when this process ends, however it ends (see the module docstring).

    Raises EtcdLabError if etcd is missing, a cluster is already recorded there, or the members
    do not become healthy within `timeout` (they are stopped again in that case).
    """
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 9:
        raise EtcdLabError(f"size must be an int in 1..9, got {size!r}")
    if not (isinstance(heartbeat_ms, int) and isinstance(election_ms, int)):
        raise EtcdLabError(
            f"heartbeat_ms/election_ms must be ints, got {heartbeat_ms!r}/{election_ms!r}"
        )
    if not 0 < heartbeat_ms * 5 <= election_ms:
        raise EtcdLabError(
            f"election_ms ({election_ms}) must be at least 5 x heartbeat_ms ({heartbeat_ms}) and > 0"
        )
    client_host = check_client_host(client_host)
    binary = Path(binary)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise EtcdLabError(
            f"etcd binary {str(binary)!r} not found: install Debian's etcd-server (make apt)"
        )
    directory = Path(state_dir) / ETCD_SUBDIR
    if directory.exists() and any(directory.glob(f"{MEMBER_PREFIX}*.json")):
        raise EtcdLabError(
            f"an etcd cluster is already recorded under {str(directory)!r}; stop_all() it first"
        )
    last_error: EtcdLabError | None = None
    for _ in range(_START_ATTEMPTS):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        try:
            ports = _free_ports([client_host, HOST] * size)
        except OSError as error:
            raise EtcdLabError(
                f"client_host {client_host!r}: cannot listen there ({error.strerror}); "
                "is it an address of this namespace?"
            ) from None
        members = [
            _member(
                directory,
                f"{MEMBER_PREFIX}{index + 1}",
                ports[2 * index],
                ports[2 * index + 1],
                client_host,
                secure,
            )
            for index in range(size)
        ]
        cluster = EtcdCluster(
            directory,
            members,
            token=f"hn-etcd-{secrets.token_hex(6)}",
            binary=binary,
            heartbeat_ms=heartbeat_ms,
            election_ms=election_ms,
            die_with_owner=die_with_owner,
            secure=secure,
            auth_token_ttl=auth_token_ttl,
        )
        cluster._save_description()
        try:
            if secure:
                cluster._make_tls_files()
            for member in members:
                cluster.start_member(member.name)
            cluster.wait_healthy(timeout, names=cluster.names())
            if secure:
                cluster._enable_auth()
        except EtcdLabError as error:
            last_error = error
            cluster.stop(remove_data=False)
            if "address already in use" not in error.args[0]:
                raise
            continue
        return cluster
    assert last_error is not None
    raise last_error


def _member(
    directory: Path,
    name: str,
    client_port: int,
    peer_port: int,
    client_host: str,
    secure: bool = False,
) -> EtcdMember:
    return EtcdMember(
        name=name,
        client_port=client_port,
        peer_port=peer_port,
        data_dir=directory / f"{name}.data",
        log_file=directory / f"{name}.log",
        record_file=directory / f"{name}.json",
        client_host=client_host,
        secure=secure,
    )


def stop_all(state_dir: Path) -> list[int]:
    """End every etcd member recorded under `state_dir/etcd/` (verified by PID, start time and
    command line) and remove the directory. Returns the PIDs that were stopped. Idempotent."""
    directory = Path(state_dir) / ETCD_SUBDIR
    if not directory.is_dir():
        return []
    stopped: list[int] = []
    failures: list[str] = []
    for record_file in sorted(directory.glob(f"{MEMBER_PREFIX}*.json")):
        try:
            record = _ProcessRecord.from_json(record_file.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            record_file.unlink(missing_ok=True)  # unreadable: nothing we could safely signal
            continue
        if record.is_running():
            if not _end_process(record):
                failures.append(f"{record.name} (pid {record.pid}) survived SIGKILL")
                continue
            stopped.append(record.pid)
        record_file.unlink(missing_ok=True)
    if failures:
        raise EtcdLabError("could not stop: " + "; ".join(failures))
    shutil.rmtree(directory, ignore_errors=True)
    return stopped


def _recorded_owner(cluster_directory: Path) -> object:
    """The owner `cluster.json` records (None: none, or no readable description)."""
    try:
        data = json.loads((cluster_directory / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("owner") if isinstance(data, dict) else None


def _parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_stale(directory: Path, now: float) -> bool:
    """A throwaway cluster directory whose owner is gone. Without an owner on record (a
    cluster started by older code): stale when its members were orphaned (their parent is
    init now), or, with none running, when it is old enough that no start is writing it."""
    owner = _recorded_owner(directory / ETCD_SUBDIR)
    if owner is not None:
        return not _owner_is_alive(owner)
    members = _throwaway_member_pids(directory)
    if members:
        return all(_parent_pid(pid) == 1 for pid in members)
    try:
        return now - directory.stat().st_mtime > _UNRECORDED_GRACE_SECONDS
    except OSError:
        return False


def _throwaway_member_pids(directory: Path) -> list[int]:
    """Live etcd processes whose data dir lies in `directory` (records may be gone)."""
    pids = []
    marker = str(directory) + os.sep
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _read_cmdline(int(entry))
        if not argv or "--data-dir" not in argv[:-1]:
            continue
        data_dir = argv[argv.index("--data-dir") + 1]
        token = ""
        if "--initial-cluster-token" in argv[:-1]:
            token = argv[argv.index("--initial-cluster-token") + 1]
        if (
            data_dir.startswith(marker)
            and token.startswith(MEMBER_PREFIX)
            and not _is_zombie(int(entry))
        ):
            pids.append(int(entry))
    return pids


def clean_stale_clusters(
    roots: tuple[Path, ...] = THROWAWAY_ROOTS,
) -> tuple[list[int], list[str]]:
    """End the members of every throwaway cluster (`hn-etcd-*` under `roots`) whose owner is
    gone, and remove its directory. Returns (PIDs ended, directories removed). A cluster whose
    owner still runs (a test session in progress) is left alone."""
    ended: list[int] = []
    removed: list[str] = []
    now = time.time()
    for root in dict.fromkeys(roots):
        if not root.is_dir():
            continue
        for directory in sorted(root.glob(f"{THROWAWAY_PREFIX}*")):
            if not directory.is_dir() or directory.is_symlink() or not _is_stale(directory, now):
                continue
            with contextlib.suppress(EtcdLabError):
                ended += stop_all(directory)
            for pid in _throwaway_member_pids(directory):
                argv = tuple(_read_cmdline(pid) or ())
                record = _ProcessRecord("orphan", pid, _read_start_time(pid) or 0, argv)
                if _end_process(record, timeout=2.0):
                    ended.append(pid)
            shutil.rmtree(directory, ignore_errors=True)
            if not directory.exists():
                removed.append(str(directory))
    return ended, removed
