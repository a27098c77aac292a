"""How `hivenet` reports failures: server errors (exit 1, field and value named on stderr),
usage errors (exit 2), authentication and connection failures, and the typed client errors."""

from __future__ import annotations

import pytest

from hivenet.api.client import (
    ApiConnectionError,
    AuthenticationError,
    ConflictError,
    HivenetClient,
    NotFoundError,
    PreconditionFailedError,
    ValidationError,
)
from hivenet.model import DeviceKind, Port
from tests.integration.cli.conftest import Hivenet, RunningApi, free_local_port


def test_bad_mac_names_field_and_value(hivenet: Hivenet, unique: str) -> None:
    hivenet.ok("bridge", "create", "--id", f"mac-{unique}")
    result = hivenet.fails(
        "port",
        "create",
        "--device-kind",
        "bridge",
        "--device-id",
        f"mac-{unique}",
        "--mac",
        "zz:01",
    )
    assert "422" in result.stderr
    assert "mac" in result.stderr and "zz:01" in result.stderr
    assert result.stdout == ""
    assert hivenet.json("port", "list", "--device-id", f"mac-{unique}")["items"] == []


def test_missing_reference_names_field_and_value(hivenet: Hivenet, unique: str) -> None:
    result = hivenet.fails(
        "port", "create", "--device-kind", "bridge", "--device-id", f"absent-{unique}"
    )
    assert "device_id" in result.stderr and f"absent-{unique}" in result.stderr


def test_bad_value_through_set_names_field(hivenet: Hivenet) -> None:
    result = hivenet.fails("tunnel-zone", "create", "--set", "vxlan_port=70000")
    assert "vxlan_port" in result.stderr and "70000" in result.stderr


def test_server_owned_tunnel_key_is_refused(hivenet: Hivenet, unique: str) -> None:
    hivenet.ok("bridge", "create", "--id", f"tk-{unique}")
    result = hivenet.fails(
        "port", "create", "--device-kind", "bridge", "--device-id", f"tk-{unique}",
        "--set", "tunnel_key=77",
    )  # fmt: skip
    assert "tunnel_key" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["bridge", "create", "--set", "colour=blue"], "has no field 'colour'"),
        (["bridge", "create", "--set", "novalue"], "expected FIELD=VALUE"),
        (["bridge", "create", "--name", "a", "--set", "name=b"], "both by its own option"),
        (["rule", "create", "--chain-id", "c", "--action", "drop", "--tp-dst", "80-x"], "80-x"),
        (["tunnel-zone", "create", "--member", "no-ip"], "HOST_ID=UNDERLAY_IP"),
        (["port", "create", "--vlan-id", "ten"], "--vlan-id"),
        (["route", "create", "--type", "sideways"], "sideways"),
        (["bridge", "update", "some-id"], "nothing to change"),
        (["bridge", "frobnicate"], "frobnicate"),
    ],
)
def test_usage_errors_exit_2_without_calling_the_server(
    hivenet: Hivenet, args: list[str], expected: str
) -> None:
    # An unreachable URL proves the command failed before any request.
    result = hivenet.fails(*args, code=2, env={"HIVENET_API_URL": "http://127.0.0.1:9"})
    assert expected in result.stderr


def test_wrong_token_is_a_clear_401(hivenet: Hivenet) -> None:
    result = hivenet.fails("--token", "not-the-token", "bridge", "list")
    assert "401" in result.stderr
    assert "rejected the token from --token option" in result.stderr


def test_missing_token_says_where_it_looked(hivenet: Hivenet) -> None:
    result = hivenet.fails("bridge", "list", env={"HIVENET_TOKEN": None})
    assert "401" in result.stderr
    assert "no token was sent" in result.stderr and "admin-token" in result.stderr


def test_unreachable_server_is_exit_1_with_hint(hivenet: Hivenet) -> None:
    url = f"http://127.0.0.1:{free_local_port()}"
    result = hivenet.fails("--api-url", url, "host", "list")
    assert f"cannot reach the HiveNet API at {url}" in result.stderr
    assert "--api-url option" in result.stderr and "hivenet serve" in result.stderr


def test_client_raises_typed_errors_with_details(api_server: RunningApi, unique: str) -> None:
    with HivenetClient(api_server.url, api_server.token) as client:
        with pytest.raises(NotFoundError) as not_found:
            client.get("bridge", f"nothing-{unique}")
        assert not_found.value.status == 404

        bridge = client.create("bridge", {"id": f"typed-{unique}"})
        with pytest.raises(ValidationError) as invalid:
            client.create("port", {"device_kind": "bridge", "device_id": bridge.id, "mac": "zz"})
        assert any(d.field == "mac" and d.value == "zz" for d in invalid.value.details)

        # The same create again is a retry: it returns the first result; another is a conflict.
        assert client.create("bridge", {"id": bridge.id}) == bridge
        with pytest.raises(ConflictError):
            client.create("bridge", {"id": bridge.id, "name": "another"})

        assert bridge.revision is not None
        client.update("bridge", bridge.id, {"name": "x"}, if_revision=bridge.revision)
        with pytest.raises(PreconditionFailedError):
            client.update("bridge", bridge.id, {"name": "y"}, if_revision=bridge.revision)

        port = client.create_object(
            Port(device_kind=DeviceKind.BRIDGE, device_id=bridge.id, name="from-model")
        )
        model = port.to_model()
        assert isinstance(model, Port) and model.tunnel_key > 0
        with pytest.raises(ConflictError) as referenced:
            client.delete("bridge", bridge.id)
        assert referenced.value.status == 409
        client.delete("bridge", bridge.id, cascade=True)
        with pytest.raises(NotFoundError):
            client.get("port", port.id)

    with HivenetClient(api_server.url, "wrong") as client:
        assert client.health()["status"] == "ok"  # health needs no token
        with pytest.raises(AuthenticationError):
            client.list_page("bridge")

    with (
        HivenetClient(f"http://127.0.0.1:{free_local_port()}", "t") as client,
        pytest.raises(ApiConnectionError),
    ):
        client.health()


def test_client_follows_pages(api_server: RunningApi, unique: str) -> None:
    tenant = f"pages-{unique}"
    with HivenetClient(api_server.url, api_server.token) as client:
        created = sorted(client.create("host", {"tenant_id": tenant}).id for _ in range(5))
        assert [h["id"] for h in client.iter_all("host", {"tenant_id": tenant}, page_size=2)] == (
            created
        )
        with pytest.raises(ValueError, match="limit=0"):
            client.list_page("host", limit=0)
        with pytest.raises(ValueError, match="unknown kind"):
            client.get("switch", "x")
