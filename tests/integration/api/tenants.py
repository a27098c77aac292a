"""Helpers for the tenancy tests: issue project tokens through the API and act as them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.integration.api.conftest import Api


@dataclass(frozen=True)
class Caller:
    """One token on an `Api`: requests as that token."""

    api: Api
    token: str

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return self.api.client.request(method, url, headers=headers, **kwargs)

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.request("POST", f"/v1/{plural}", json=body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


def issue(api: Api, project: str, role: str, *, by: str | None = None, **extra: Any) -> Caller:
    """A new token of `role` in `project`, issued by the token `by` (default: the admin)."""
    issuer = Caller(api, by or api.token)
    response = issuer.request(
        "POST", "/v1/tokens", json={"project": project, "role": role, **extra}
    )
    assert response.status_code == 201, response.text
    return Caller(api, response.json()["secret"])
