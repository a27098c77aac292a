"""`clean()`: remove everything the lab made, also after a crash (`mn -c` for HiveNet).

Owns: ending the processes recorded in the lab's PID files, deleting the `hn*` network
namespaces and the `hn*` links of the root namespace, and (for a clean of every lab) ending the
throwaway etcd clusters of tests and benchmarks whose owner is gone, with their `hn-etcd-*`
data directories (`hivenet.lab.etcd.clean_stale_clusters`). Idempotent: a second run finds nothing
and succeeds. Run it as `python -m hivenet.lab.cleanup [--tag TAG]` (root).

Must not touch: anything not named with the `hn` prefix, or a PID that no longer is the process
the lab started (checked through its start time and /proc/<pid>/cmdline before any signal).
Processes still inside a namespace being deleted are ended too (by PID, after the recorded ones):
only the lab puts processes into `hn*` namespaces, and a namespace lives on while any process
holds it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import netns

from hivenet.lab.etcd import clean_stale_clusters
from hivenet.lab.netns import (
    NAME_PREFIX,
    LabScope,
    ProcessRecord,
    delete_link,
    delete_namespace,
    list_links,
    list_namespaces,
    state_dir,
    stop_process,
)

log = logging.getLogger(__name__)


@dataclass
class CleanReport:
    """What `clean()` removed (names and PIDs), and what it could not."""

    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    pid_files: list[str] = field(default_factory=list)
    bpf_pins: list[str] = field(default_factory=list)
    # Not a lab's own leftovers (so not part of is_empty()): what dead test runs left.
    stale_etcd_dirs: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.processes or self.namespaces or self.links or self.failures)


def clean(tag: str = "", *, directory: Path | None = None) -> CleanReport:
    """Remove the lab objects of scope `tag` ("": every `hn*` object of every lab)."""
    scope = LabScope(tag)
    pid_directory = directory or state_dir()
    report = CleanReport()
    _stop_recorded_processes(scope, pid_directory, report)
    namespaces = list_namespaces(scope.namespace_prefix)
    _stop_processes_inside(namespaces, report)
    for namespace in namespaces:
        try:
            if delete_namespace(namespace):
                report.namespaces.append(namespace)
        except OSError as error:
            report.failures.append(f"namespace {namespace}: {error}")
    # Root ends of veth pairs vanish with their peer's namespace, but asynchronously; a link
    # already gone counts as done.
    for link in list_links(scope.link_prefix):
        try:
            if delete_link(link):
                report.links.append(link)
        except Exception as error:  # report it and go on with the other links
            report.failures.append(f"link {link}: {error}")
    if not tag:
        _clean_stale_etcd(report)
    # eBPF fast-path pins (/sys/fs/bpf/hn-*) of datapaths that died, or all on a full clean;
    # their tc filters and VXLAN devices went with the links and namespaces above.
    from hivenet.datapath.ebpf.kernel import remove_stale_pins

    try:
        report.bpf_pins = remove_stale_pins(every=not tag)
    except OSError as error:
        report.failures.append(f"bpf pins: {error}")
    return report


def _clean_stale_etcd(report: CleanReport) -> None:
    """Throwaway etcd clusters (tests, benchmarks) whose owner died without stopping them."""
    try:
        ended, removed = clean_stale_clusters()
    except OSError as error:
        report.failures.append(f"stale etcd clusters: {error}")
        return
    report.processes.extend(ended)
    report.stale_etcd_dirs.extend(removed)


def _stop_recorded_processes(scope: LabScope, directory: Path, report: CleanReport) -> None:
    if not directory.is_dir():
        return
    for pid_file in sorted(directory.glob(f"{scope.namespace_prefix}*.json")):
        try:
            record = ProcessRecord.from_json(pid_file.read_text())
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("removing unreadable PID file %s: %s", pid_file, error)
        else:
            if record.is_running():
                if stop_process(record.pid):
                    report.processes.append(record.pid)
                else:
                    report.failures.append(f"process {record.pid} ({record.label}) survived")
                    continue
        pid_file.unlink(missing_ok=True)
        report.pid_files.append(pid_file.name)


def _stop_processes_inside(namespaces: list[str], report: CleanReport) -> None:
    if not namespaces:
        return
    wanted = set(namespaces)
    own_pid = os.getpid()
    for pid, namespace in _pids_by_namespace().items():
        if namespace in wanted and pid != own_pid and stop_process(pid):
            report.processes.append(pid)


def _pids_by_namespace() -> dict[int, str]:
    """PID -> name of the named namespace its network namespace is (PIDs in unnamed or the
    root namespace are left out)."""
    inode_to_name: dict[int, str] = {}
    for name in netns.listnetns():
        try:
            inode_to_name[os.stat(os.path.join(netns.NETNS_RUN_DIR, name)).st_ino] = name
        except OSError:
            continue
    result: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue
        name = inode_to_name.get(inode)
        if name is not None and name.startswith(NAME_PREFIX):
            result[int(entry)] = name
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Remove every hn* namespace, link and process.")
    parser.add_argument("--tag", default="", help="only the lab scope with this 4-char tag")
    args = parser.parse_args(argv)
    report = clean(args.tag)
    print(
        f"stopped {len(report.processes)} process(es), deleted {len(report.namespaces)} "
        f"namespace(s), {len(report.links)} link(s) and {len(report.stale_etcd_dirs)} stale "
        f"etcd data dir(s){f', {len(report.bpf_pins)} BPF pin dir(s)' if report.bpf_pins else ''}"
    )
    for failure in report.failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
