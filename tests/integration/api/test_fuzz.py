"""Schemathesis fuzzes HiveNet's own /v1 API from its OpenAPI document (/openapi.json), in
process (ASGI), as the cluster admin and as a project member: every operation with generated
requests, then a stateful run (schemathesis's state machine over the links it infers between
operations: a create's id feeds the get, patch and delete of that object) whose every step
carries the principal's token (`get_call_kwargs`). It demands no 5xx, and that every 4xx
carries the error shape of `api/errors.py` with a message, and for a 422 a field on every
detail that the message names. Bounded: a few examples per operation, and a few dozen
scenarios, well under a minute per principal here."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from hivenet.api import create_app
from hivenet.api.auth import ADMIN_TOKEN_FILE
from hivenet.model import KINDS

pytestmark = pytest.mark.timeout(600)

EXAMPLES_PER_OPERATION = 8
STATEFUL_SCENARIOS = 40
STATEFUL_STEPS = 8
PROJECT = "fuzz"


def error_shape(ctx: Any, response: Any, case: schemathesis.Case) -> bool:
    """A 4xx is `{"error": {"status", "message", "details"}}`; a 422's details each name a
    field, and its message names them."""
    status = response.status_code
    if not 400 <= status < 500:
        return True
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    where = f"{case.method} {case.formatted_path} -> {status}: {response.text[:500]}"
    assert isinstance(error, dict), f"no error object: {where}"
    assert error.get("status") == status, f"status mismatch: {where}"
    message = error.get("message")
    assert isinstance(message, str) and message.strip(), f"no message: {where}"
    if status == 422:
        details = error.get("details")
        assert details, f"a 422 without details: {where}"
        for item in details:
            field = item.get("field")
            if field is None:  # about the object as a whole
                assert names_a_field(item["message"]), f"a detail naming no field: {where}"
                continue
            assert field.split(".")[0] in message, f"message does not name {field!r}: {where}"
    return True


# A detail about the object as a whole (a rule between fields: `field` is None, errors.py)
# must still name one of the fields in its message.
FIELD_NAMES = frozenset(name for cls in KINDS.values() for name in cls.model_fields)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def names_a_field(message: str) -> bool:
    return any(word in FIELD_NAMES for word in _WORD.findall(message))


CHECKS = [not_a_server_error, schemathesis.check(error_shape)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, dict[str, str]]]:
    """The app, and the bearer token of each principal ("admin", "member")."""
    directory = tmp_path_factory.mktemp("hn-fuzz-v1")
    state_dir = directory / "hn-state"
    # A file store: schemathesis's ASGI client runs the app's lifespan again, which must find
    # the member token issued here.
    application = create_app(f"sqlite://{directory}/fuzz.db", state_dir)
    with TestClient(application) as client:  # runs the lifespan: the store is open
        admin = (state_dir / ADMIN_TOKEN_FILE).read_text().strip()
        issued = client.post(
            "/v1/tokens",
            json={"project": PROJECT, "role": "member"},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert issued.status_code == 201, issued.text
        yield application, {"admin": admin, "member": issued.json()["secret"]}


def _schema(app: object) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("principal", ["admin", "member"])
def test_every_operation_answers_without_5xx_and_with_named_fields(
    served: tuple[object, dict[str, str]], principal: str
) -> None:
    app, tokens = served
    headers = {"Authorization": f"Bearer {tokens[principal]}"}
    ran: dict[str, set[int]] = {}
    for result in _schema(app).get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run_one(case: schemathesis.Case) -> None:
            response = case.call(headers=headers)
            ran.setdefault(case.operation.label, set()).add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        run_one()
    # Every collection was exercised, and some requests got through.
    assert {"POST /v1/ports", "PATCH /v1/bridges/{object_id}", "PUT /v1/quotas/{project}"} <= set(
        ran
    )
    assert 201 in ran["POST /v1/bridges"], ran["POST /v1/bridges"]


@pytest.mark.parametrize("principal", ["admin", "member"])
def test_stateful_sequences_carry_the_token_and_follow_links(
    served: tuple[object, dict[str, str]], principal: str
) -> None:
    """Scenarios of linked calls: every step is authenticated (a 401 would mean the token
    was lost between steps), none is a 5xx, every 4xx has the error shape, and some steps
    reach an object by an id only an earlier step's answer could have given (a 2xx on
    `/v1/<kind>/{object_id}`: generated ids never exist)."""
    app, tokens = served
    headers = {"Authorization": f"Bearer {tokens[principal]}"}
    schema = _schema(app)
    # Positive requests only: the stateless test above covers the negative ones, and a
    # negative step may drop the Authorization header on purpose (its 401 would be right).
    schema.config.generation.update(modes=[GenerationMode.POSITIVE])
    schema.config.update(headers=headers)
    statuses: dict[tuple[str, str], list[int]] = {}
    # A failed check is recorded and asserted after the run, not raised inside it: hypothesis
    # would replay the scenario to shrink it, and a replay against the server's changed state
    # draws differently (FlakyStrategyDefinition), which would hide the failure itself.
    failures: list[str] = []

    class Authenticated(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": headers}

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            sent = response.request.headers.get("Authorization")
            assert sent == headers["Authorization"], f"{case.method} {case.path}: no token"
            statuses.setdefault((case.method, case.path), []).append(response.status_code)
            super().after_call(response, case)

        def validate_response(
            self,
            response: Any,
            case: schemathesis.Case,
            additional_checks: Any = None,
            **kwargs: Any,
        ) -> None:
            try:
                case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs or None)
            except Exception as failure:  # schemathesis's FailureGroup or AssertionError
                failures.append(f"{case.method} {case.path} -> {response.status_code}: {failure}")

    # Generation follows the server's answers (links, harvested values), and the server's
    # state lives on between scenarios, so hypothesis may meet a prefix it generated before
    # drawing differently and stop the run there. What ran until then is checked below,
    # including that it ran enough.
    with contextlib.suppress(FlakyStrategyDefinition):
        Authenticated.run(
            settings=settings(
                max_examples=STATEFUL_SCENARIOS,
                stateful_step_count=STATEFUL_STEPS,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
        )
    assert not failures, failures[:5]
    every = [status for found in statuses.values() for status in found]
    assert 401 not in every, {k: v for k, v in statuses.items() if 401 in v}
    assert len(every) >= STATEFUL_SCENARIOS, len(every)
    linked = {
        key: found
        for key, found in statuses.items()
        if key[1].endswith("{object_id}") and any(200 <= s < 300 for s in found)
    }
    assert linked, sorted(statuses)
