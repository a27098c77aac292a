"""`openstack quota show|set|delete` (the real python-openstackclient) against a running
`hivenet serve`: the cluster admin (keystoneauth's admin_token plugin) sets a project's
network quota, the project (auth_type none, acting for `demo`) sees it, is refused a network
past it with Neutron's OverQuota, and may not change its own quota."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.openstack.served import ADMIN_CLOUD, NOAUTH_PROJECT, Served, serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("hn-quota")) as running:
        yield running


def _by_resource(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["Resource"]: row for row in rows}


def test_openstack_quota_set_show_and_over_quota(served: Served) -> None:
    cli = served.cli
    project = NOAUTH_PROJECT
    shown = _by_resource(
        cli("quota", "show", "--network", project, "-f", "json", cloud=ADMIN_CLOUD)
    )
    assert shown["networks"]["Limit"] == 100 and shown["ports"]["Limit"] == 500
    assert shown["routers"]["Limit"] == 10 and shown["floating_ips"]["Limit"] == 50

    cli("network", "create", "first", "-f", "json")
    cli("quota", "set", "--networks", "2", "--routers", "0", project, cloud=ADMIN_CLOUD)
    usage = _by_resource(
        cli("quota", "show", "--network", "--usage", project, "-f", "json", cloud=ADMIN_CLOUD)
    )
    assert (usage["networks"]["Limit"], usage["networks"]["In Use"]) == (2, 1)
    assert usage["routers"]["Limit"] == 0

    # The project sees its own quota, and is held to it.
    own = _by_resource(cli("quota", "show", "--network", project, "-f", "json"))
    assert own["networks"]["Limit"] == 2
    cli("network", "create", "second", "-f", "json")
    refused = cli("network", "create", "third", check=False)
    assert refused.returncode != 0
    assert "Quota exceeded for resources: ['network']" in refused.stderr, refused.stderr
    assert "may hold 2 and holds 2" in refused.stderr
    router = cli("router", "create", "r", check=False)
    assert router.returncode != 0 and "['router']" in router.stderr

    # check_limit: a limit below the usage is refused; nothing is deleted.
    below = cli("quota", "set", "--networks", "1", project, cloud=ADMIN_CLOUD, check=False)
    assert below.returncode != 0 and "below the current usage 2" in below.stderr
    # The project may not change its quota (`openstack quota set` on an auth_type none
    # cloud stops earlier, at its compute-service probe: the API's answer is checked here).
    own_set = httpx.put(
        f"{served.base_url}/v2.0/quotas/{project}",
        json={"quota": {"network": 50}},
        headers={"X-Auth-Token": "notused"},
    )
    assert own_set.status_code == 403 and "only the cluster admin" in own_set.text

    cli("network", "delete", "second")
    cli("network", "create", "again", "-f", "json")
    cli("quota", "delete", "--network", project, cloud=ADMIN_CLOUD)
    reset = _by_resource(cli("quota", "show", "--network", project, "-f", "json"))
    assert reset["networks"]["Limit"] == 100 and reset["routers"]["Limit"] == 10
