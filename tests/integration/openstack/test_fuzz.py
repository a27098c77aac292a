"""Schemathesis fuzzes the Neutron and Octavia APIs from their own OpenAPI documents (served at
/v2.0/openapi.json and /v2.0/lbaas/openapi.json) and demands that no request gets a 5xx.
Bounded: a few examples per operation, about a minute in all on a busy machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from hivenet.api import create_app
from hivenet.api.neutron import OpenStackOptions

pytestmark = pytest.mark.timeout(600)

EXAMPLES_PER_OPERATION = 12


def _app(tmp_path: Path) -> object:
    return create_app(
        "memory://", tmp_path / "hn-state", openstack=OpenStackOptions(noauth_project="fuzz")
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    application = _app(tmp_path_factory.mktemp("hn-fuzz"))
    with TestClient(application):  # runs the lifespan: the store is open
        yield application


def _fuzz(schema: schemathesis.BaseSchema) -> dict[str, set[int]]:
    """Run every operation's examples; operation label -> the statuses it answered."""
    ran: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def never_5xx(case: schemathesis.Case) -> None:
            response = case.call()
            ran.setdefault(case.operation.label, set()).add(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])

        never_5xx()
    return ran


def test_neutron_never_answers_5xx(app: object) -> None:
    ran = _fuzz(schemathesis.openapi.from_asgi("/v2.0/openapi.json", app))
    # Paths are relative to the schema's server, /v2.0. Some requests got through, too.
    assert {"POST /ports", "PUT /networks/{network_id}", "POST /security-group-rules"} <= set(ran)
    assert 201 in ran["POST /networks"], ran["POST /networks"]


def test_octavia_never_answers_5xx(app: object) -> None:
    ran = _fuzz(schemathesis.openapi.from_asgi("/v2.0/lbaas/openapi.json", app))
    assert {"POST /pools/{pool_id}/members", "GET /loadbalancers/{lb_id}/status"} <= set(ran)
