"""A stand-alone `UserspaceDatapath` with static flows, for e2e tests and benchmarks.

Owns: reading a JSON config (ports to bind, flows to install), running the datapath on an
asyncio loop until SIGTERM/SIGINT, and writing its counters to a JSON file (on start once the
ports are bound, on SIGUSR1, and on exit). No agent, no simulation: a miss is counted as an
upcall and the frame dropped.

Must not touch: anything beyond the interfaces named in the config. Run it inside the host's
network namespace: `ip netns exec hn-h1 python -m hivenet.datapath._testdriver --config c.json
--counters-file out.json`.

Config (all keys but "ports" optional):
    {"underlay_ip": "172.31.250.1", "vxlan_port": 4789,
     "ports": {"1": "hnv1h"},
     "flows": [{"match": {"in_port": 1, "eth_type": 2054},
                "actions": [{"output": 2}, {"tunnel": {"remote_ip": "172.31.250.2", "key": 7}},
                            {"set_field": {"field": "eth_dst", "value": 2}}, {"dec_ttl": true},
                            {"push_vlan": 10}, {"pop_vlan": true}, {"drop": "reason"}],
                "idle_timeout": 0}],
     "miss_actions": {"1": [{"output": 2}]},
     "tunnel_peers": ["172.31.250.2"]}
A flow's match names the fields it matches exactly (FlowMatch names, int values); every other
field is wildcarded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hivenet.datapath.userspace import DEFAULT_VXLAN_PORT, UserspaceDatapath
from hivenet.flows.actions import Action, DecTtl, Drop, Output, PopVlan, PushVlan, SetField, Tunnel
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, mask_from


def parse_action(spec: object, where: str) -> Action:
    """One action from its JSON form (see the module docstring)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where}: expected an object with one key, got {spec!r}")
    ((kind, value),) = spec.items()
    if kind == "output":
        return Output(int(value))
    if kind == "tunnel":
        if not isinstance(value, dict) or set(value) != {"remote_ip", "key"}:
            raise ValueError(f"{where}.tunnel: expected {{remote_ip, key}}, got {value!r}")
        return Tunnel(str(value["remote_ip"]), int(value["key"]))
    if kind == "set_field":
        if not isinstance(value, dict) or set(value) != {"field", "value"}:
            raise ValueError(f"{where}.set_field: expected {{field, value}}, got {value!r}")
        return SetField(str(value["field"]), int(value["value"]))
    if kind == "dec_ttl":
        return DecTtl()
    if kind == "push_vlan":
        return PushVlan(int(value))
    if kind == "pop_vlan":
        return PopVlan()
    if kind == "drop":
        return Drop(str(value))
    raise ValueError(f"{where}: unknown action {kind!r}")


def parse_flow(spec: object, where: str) -> dict[str, Any]:
    """Keyword arguments for `install_flow` from one flow's JSON form."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected an object, got {spec!r}")
    unknown = set(spec) - {"match", "actions", "idle_timeout", "hard_timeout", "tags"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
    fields = spec.get("match", {})
    if not isinstance(fields, dict):
        raise ValueError(f"{where}.match: expected an object, got {fields!r}")
    try:
        mask = mask_from({name: FULL_MASKS[name] for name in fields})
    except KeyError as error:
        raise ValueError(f"{where}.match: unknown field {error.args[0]!r}") from None
    values = {name: int(value) for name, value in fields.items()}
    match = tuple(values.get(name, 0) for name in FIELD_NAMES)
    actions = [
        parse_action(action, f"{where}.actions[{index}]")
        for index, action in enumerate(spec.get("actions", []))
    ]
    return {
        "match": match,
        "mask": mask,
        "actions": actions,
        "tags": spec.get("tags", ["static"]),
        "idle_timeout": float(spec.get("idle_timeout", 0.0)),
        "hard_timeout": float(spec.get("hard_timeout", 0.0)),
    }


def driver_argv(config_file: Path, counters_file: Path) -> list[str]:
    """The command line that runs this driver (prefix it with `ip netns exec <ns>`)."""
    return [
        sys.executable,
        "-m",
        "hivenet.datapath._testdriver",
        "--config",
        str(config_file),
        "--counters-file",
        str(counters_file),
    ]


def read_counters(counters_file: Path) -> dict[str, int] | None:
    """The last counters the driver wrote (with "sequence" and "pid"), None before the first."""
    try:
        document = json.loads(counters_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return {str(key): int(value) for key, value in document.items()}


def request_counters(pid: int, counters_file: Path, timeout: float = 5.0) -> dict[str, int]:
    """Ask the driver with `pid` for fresh counters (SIGUSR1) and wait until it wrote them."""
    before = read_counters(counters_file)
    sequence = before["sequence"] if before else 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = read_counters(counters_file)
        if current is not None and current["sequence"] > sequence:
            return current
        time.sleep(0.02)
    raise TimeoutError(f"datapath driver {pid} wrote no counters to {counters_file}")


class _CountersWriter:
    def __init__(self, datapath: UserspaceDatapath, path: Path) -> None:
        self.datapath = datapath
        self.path = path
        self.sequence = 0

    def write(self) -> None:
        self.sequence += 1
        document = {"sequence": self.sequence, "pid": os.getpid()}
        document.update(self.datapath.counters())
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document, sort_keys=True))
        temporary.replace(self.path)


async def serve(config: dict[str, Any], counters_file: Path) -> None:
    datapath = UserspaceDatapath(
        config.get("underlay_ip"), vxlan_port=int(config.get("vxlan_port", DEFAULT_VXLAN_PORT))
    )
    datapath.start()
    if "tunnel_peers" in config:  # as an agent does: VXLAN only from these sources
        datapath.set_tunnel_peers(config["tunnel_peers"])
    miss_actions = {
        int(key): [
            parse_action(action, f"miss_actions[{key}][{index}]")
            for index, action in enumerate(actions)
        ]
        for key, actions in config.get("miss_actions", {}).items()
    }

    def on_miss(port_key: int, frame: bytes) -> None:
        actions = miss_actions.get(port_key)
        if actions:
            datapath.execute(frame, actions)

    datapath.set_upcall_handler(on_miss)
    try:
        for key, interface_name in config.get("ports", {}).items():
            datapath.bind_port(int(key), str(interface_name))
        for index, flow in enumerate(config.get("flows", [])):
            datapath.install_flow(**parse_flow(flow, f"flows[{index}]"))
        writer = _CountersWriter(datapath, counters_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, writer.write)
        writer.write()
        await stop.wait()
        writer.write()
    finally:
        datapath.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, required=True, help="JSON config file")
    parser.add_argument("--counters-file", type=Path, required=True, help="JSON counters out")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    if not isinstance(config, dict):
        raise SystemExit(f"--config {args.config}: expected a JSON object")
    asyncio.run(serve(config, args.counters_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
