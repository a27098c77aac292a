"""Issue 15, the tenancy property: random multi-project topologies, random API calls (get,
list, create, patch, delete, with random references including other projects' ids and ids
that never existed) by random principals (reader/member/admin of a random project, or the
cluster admin), through the app in-process. After every call by a project token:

- the answer names no object of another project (not shared) that the request did not name
  itself: gets and lists return only what the caller may see, errors leak no ids;
- no object of another project was created, changed or deleted (a reader changes nothing);
- every object the call wrote references only its project's objects or shared ones;
- shared objects (bridges the cluster admin flags `shared`, which it also unflags at random,
  and their subnets) are readable by every project, and a member's port on a shared bridge
  is created, owned by the member's project; they are changed only by their own project.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivenet.api import create_app
from hivenet.model import KINDS, TOPOLOGY_PREFIX, TopologyObject, is_shared, parse_topology_key
from hivenet.model.subnet import Subnet
from tests.integration.api.conftest import Api, start
from tests.integration.api.tenants import Caller, issue

ROLES = ("reader", "member", "admin")
WRITE_KINDS = ("bridge", "router", "chain", "port", "rule", "route", "subnet")
MISSING = "00000000-0000-4000-8000-00000000dead"
PREFIXES = ("10.0.0.0/8", "192.168.1.0/24", "0.0.0.0/0")


def objects(api: Api) -> dict[str, tuple[TopologyObject, int]]:
    """id -> (object, mod_revision) of every topology object."""
    _, kvs = api.dump()
    found: dict[str, tuple[TopologyObject, int]] = {}
    for kv in kvs:
        if kv.key.startswith(TOPOLOGY_PREFIX):
            kind, object_id = parse_topology_key(kv.key)
            found[object_id] = (KINDS[kind].model_validate_json(kv.value), kv.mod_revision)
    return found


class Example:
    """One example's world on the shared app: its projects, and the ids it made in creation
    order (so a replayed example draws the same objects although the store holds earlier
    examples' objects too)."""

    def __init__(self, api: Api, number: int, project_count: int) -> None:
        self.api = api
        self.prefix = f"e{number}x"
        self.projects = [f"{self.prefix}p{i}" for i in range(project_count)]
        self.made: list[str] = []

    def new_id(self) -> str:
        object_id = f"{self.prefix}{len(self.made):04d}z"  # no id is a substring of another
        self.made.append(object_id)
        return object_id

    def create(self, plural: str, body: dict[str, Any]) -> str:
        created: str = self.api.create(plural, {"id": self.new_id(), **body})["id"]
        return created

    def seed(self, data: st.DataObject) -> None:
        """Per project: a chain, bridges with a port, a subnet, a router with a port, a route
        and a rule; one shared bridge with a subnet owned by the first project."""
        for number, project in enumerate(self.projects):
            chain = self.create("chains", {"tenant_id": project})
            for _ in range(data.draw(st.integers(1, 2), label="bridges")):
                bridge = self.create("bridges", {"tenant_id": project, "inbound_chain_id": chain})
                self.create(
                    "ports", {"tenant_id": project, "device_kind": "bridge", "device_id": bridge}
                )
            self.create(
                "subnets",
                {"tenant_id": project, "bridge_id": bridge, "cidr": f"10.{number}.0.0/24"},
            )
            router = self.create("routers", {"tenant_id": project, "outbound_chain_id": chain})
            port = self.create(
                "ports",
                {
                    "tenant_id": project,
                    "device_kind": "router",
                    "device_id": router,
                    "addresses": ["10.1.0.1/24"],
                },
            )
            self.create(
                "routes",
                {
                    "tenant_id": project,
                    "router_id": router,
                    "dst_prefix": "10.2.0.0/16",
                    "next_hop_port_id": port,
                },
            )
            self.create(
                "rules",
                {
                    "tenant_id": project,
                    "chain_id": chain,
                    "action": "accept",
                    "in_port_ids": [port],
                },
            )
        shared = self.create(
            "bridges", {"tenant_id": self.projects[0], "name": "ext", "shared": True}
        )
        self.create(
            "subnets", {"tenant_id": self.projects[0], "bridge_id": shared, "cidr": "10.9.0.0/24"}
        )

    def ref(
        self, data: st.DataObject, world: dict[str, tuple[TopologyObject, int]], kind: str
    ) -> str:
        ids = [i for i in self.made if i in world and kind == world[i][0].KIND]
        return data.draw(st.sampled_from([*ids, MISSING]), label=f"{kind} ref")

    def body_for(
        self, kind: str, data: st.DataObject, world: dict[str, tuple[TopologyObject, int]]
    ) -> dict[str, Any]:
        body: dict[str, Any]
        if kind in ("bridge", "router"):
            field = "inbound_chain_id" if kind == "bridge" else "outbound_chain_id"
            body = {"name": data.draw(st.sampled_from(["a", "b"]))}
            if data.draw(st.booleans(), label="chain?"):
                body[field] = self.ref(data, world, "chain")
            if kind == "bridge" and data.draw(st.integers(0, 2), label="shared?") == 0:
                body["shared"] = data.draw(st.booleans(), label="shared")
        elif kind == "subnet":
            body = {
                "bridge_id": self.ref(data, world, "bridge"),
                "cidr": data.draw(st.sampled_from(["10.7.0.0/24", "10.9.0.0/25"])),
            }
        elif kind == "chain":
            body = {"name": "c"}
        elif kind == "port":
            device_kind = data.draw(st.sampled_from(["bridge", "router"]), label="device kind")
            body = {"device_kind": device_kind, "device_id": self.ref(data, world, device_kind)}
            if device_kind == "router" and data.draw(st.booleans(), label="peer?"):
                body["peer_id"] = self.ref(data, world, "port")
            if device_kind == "bridge" and data.draw(st.booleans(), label="fixed ip?"):
                body["fixed_ips"] = [{"subnet_id": self.ref(data, world, "subnet")}]
        elif kind == "rule":
            body = {"chain_id": self.ref(data, world, "chain"), "action": "accept"}
            if data.draw(st.booleans(), label="ports?"):
                body["in_port_ids"] = [self.ref(data, world, "port")]
        else:
            body = {
                "router_id": self.ref(data, world, "router"),
                "dst_prefix": data.draw(st.sampled_from(PREFIXES)),
                "next_hop_port_id": self.ref(data, world, "port"),
            }
        if data.draw(st.integers(0, 4), label="tenant?") == 0:
            body["tenant_id"] = data.draw(st.sampled_from(self.projects), label="tenant_id")
        return body


def shared(obj: TopologyObject, world: dict[str, tuple[TopologyObject, int]]) -> bool:
    """Every project may read and reference it: a shared bridge, or a subnet of one."""
    if isinstance(obj, Subnet):
        bridge = world.get(obj.bridge_id)
        return bridge is not None and is_shared(bridge[0])
    return is_shared(obj)


def check_call(
    project: str,
    role: str,
    sent: str,
    answer: str,
    before: dict[str, tuple[TopologyObject, int]],
    after: dict[str, tuple[TopologyObject, int]],
) -> None:
    def visible(obj: TopologyObject) -> bool:
        return obj.tenant_id == project or shared(obj, before) or shared(obj, after)

    # Nothing of another project is named in the answer unless the request named it, or
    # one of the caller's own objects does (a reference only the cluster admin could make).
    known = {
        target
        for obj, _ in [*before.values(), *after.values()]
        if visible(obj)
        for _field, _kind, target in obj.references()
    }
    for object_id, (obj, _) in [*before.items(), *after.items()]:
        if not visible(obj) and object_id not in sent and object_id not in known:
            assert object_id not in answer, f"{obj.KIND} {object_id} of {obj.tenant_id} leaked"
    # Nothing of another project changed; a reader changes nothing.
    for object_id in before.keys() | after.keys():
        old, new = before.get(object_id), after.get(object_id)
        if old == new:
            continue
        assert role != "reader", f"a reader changed {object_id}"
        for entry in (old, new):
            assert entry is None or entry[0].tenant_id == project, (
                f"{object_id} of {entry[0].tenant_id} changed by {role} of {project}"
            )
        # What it wrote references only what it may see (host bindings are the admin's).
        if new is not None:
            for field, kind, target in new[0].references():
                if kind == "host":
                    continue
                target_obj = after[target][0]
                assert visible(target_obj), f"{object_id}.{field} -> {kind} {target} of other"


def check_shared_access(
    project: str,
    role: str,
    op: str,
    kind: str,
    target: str,
    body: dict[str, Any] | None,
    response: Any,
    world: dict[str, tuple[TopologyObject, int]],
) -> None:
    """What sharing grants: any project reads a shared object, and its member attaches a
    plain port (no tenant override, no other reference) to a shared bridge, owned by it."""
    entry = world.get(target)
    if op == "get" and entry is not None and shared(entry[0], world):
        assert response.status_code == 200, response.text
    if (
        op == "create"
        and kind == "port"
        and role != "reader"
        and body is not None
        and set(body) == {"id", "device_kind", "device_id"}
        and body["device_kind"] == "bridge"
        and body["device_id"] in world
        and shared(world[body["device_id"]][0], world)
    ):
        assert response.status_code == 201, response.text
        assert response.json()["tenant_id"] == project


_EXAMPLES = itertools.count()


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One app for every example (starting one per example would dominate the run)."""
    state_dir = tmp_path_factory.mktemp("hn-tenancy-props")
    yield from start(create_app("memory://", state_dir), state_dir)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_project_token_reads_or_changes_another_project(
    shared_api: Api, data: st.DataObject
) -> None:
    api = shared_api
    example = Example(api, next(_EXAMPLES), data.draw(st.integers(2, 3), label="projects"))
    example.seed(data)
    callers = {(p, r): issue(api, p, r) for p in example.projects for r in ROLES}
    admin = Caller(api, api.token)
    for _ in range(data.draw(st.integers(10, 25), label="calls")):
        world = objects(api)
        principal = data.draw(st.sampled_from([None, *callers]), label="principal")
        caller = admin if principal is None else callers[principal]
        kind = data.draw(st.sampled_from(WRITE_KINDS), label="kind")
        plural = f"{kind}s"
        op = data.draw(st.sampled_from(["get", "list", "create", "patch", "delete"]))
        target = example.ref(data, world, kind)
        method, url, body = "GET", f"/v1/{plural}", None
        if op == "get":
            url = f"/v1/{plural}/{target}"
        elif op == "create":
            method, body = "POST", {"id": example.new_id(), **example.body_for(kind, data, world)}
        elif op == "patch":
            method, url = "PATCH", f"/v1/{plural}/{target}"
            body = example.body_for(kind, data, world)
            if kind in ("port", "rule", "route"):  # their owner fields cannot change
                for owner_field in ("device_kind", "device_id", "chain_id", "router_id"):
                    body.pop(owner_field, None)
        elif op == "delete":
            cascade = data.draw(st.booleans(), label="cascade")
            method, url = "DELETE", f"/v1/{plural}/{target}?cascade={str(cascade).lower()}"
        response = caller.request(method, url, json=body)
        assert response.status_code < 500, response.text
        if principal is not None:
            project, role = principal
            sent = url + json.dumps(body)
            check_call(project, role, sent, response.text, world, objects(api))
            check_shared_access(project, role, op, kind, target, body, response, world)
    api.assert_consistent()
