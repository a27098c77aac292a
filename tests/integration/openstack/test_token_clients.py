"""The real `openstack` CLI on `/v1/tokens` project tokens against a running `hivenet
serve`: a member builds in its project, a reader lists it and is refused every write with the
reason, a project token may not share a network, and a network the cluster admin shares is
listed by the project, which attaches its own port to it but cannot change it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.openstack.served import ADMIN_CLOUD, Served, serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("hn-tokens")) as running:
        yield running


def test_member_reader_and_shared_network_with_the_openstack_cli(served: Served) -> None:
    cli = served.cli
    member = served.issue_token_cloud("acme-member", "acme", "member")
    reader = served.issue_token_cloud("acme-reader", "acme", "reader")
    other = served.issue_token_cloud("other-member", "other", "member")

    network = cli("network", "create", "acme-net", "-f", "json", cloud=member)
    assert network["project_id"] == "acme"
    cli("subnet", "create", "--network", "acme-net", "--subnet-range", "10.30.0.0/24",
        "acme-subnet", "-f", "json", cloud=member)  # fmt: skip
    listed = cli("network", "list", "-f", "json", cloud=reader)
    assert [n["Name"] for n in listed] == ["acme-net"]
    assert cli("network", "list", "-f", "json", cloud=other) == []

    for args in (
        ("network", "create", "nope"),
        ("network", "set", "--name", "renamed", "acme-net"),
        ("network", "delete", "acme-net"),
        ("port", "create", "--network", "acme-net", "p"),
    ):
        refused = cli(*args, cloud=reader, check=False)
        assert refused.returncode != 0, args
        assert "'reader' may only read" in refused.stderr, (args, refused.stderr)

    shared_refused = cli("network", "create", "--share", "mine", cloud=member, check=False)
    assert shared_refused.returncode != 0
    assert "shared=True: only the cluster admin" in shared_refused.stderr, shared_refused.stderr

    common = cli("network", "create", "--share", "common", "-f", "json", cloud=ADMIN_CLOUD)
    assert common["shared"] is True
    cli("subnet", "create", "--network", common["id"], "--subnet-range", "10.40.0.0/24",
        "common-subnet", "-f", "json", cloud=ADMIN_CLOUD)  # fmt: skip
    visible = {n["Name"] for n in cli("network", "list", "-f", "json", cloud=other)}
    assert visible == {"common"}
    port = cli("port", "create", "--network", common["id"], "other-port", "-f", "json",
               cloud=other)  # fmt: skip
    assert port["project_id"] == "other"
    assert port["fixed_ips"][0]["ip_address"].startswith("10.40.0.")
    renamed = cli("network", "set", "--name", "taken", common["id"], cloud=other, check=False)
    assert renamed.returncode != 0 and "shared by another project" in renamed.stderr
    deleted = cli("network", "delete", common["id"], cloud=other, check=False)
    assert deleted.returncode != 0
    assert cli("network", "show", common["id"], "-f", "json", cloud=ADMIN_CLOUD)["name"] == "common"
    cli("port", "delete", "other-port", cloud=other)
