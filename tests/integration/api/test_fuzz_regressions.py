"""Server bugs the /v1 fuzz test (test_fuzz.py) found, each pinned by its own request."""

from __future__ import annotations

from tests.integration.api.conftest import Api


def test_an_unknown_field_with_any_characters_is_named(api: Api) -> None:
    """A PATCH with a key that is not an identifier was answered 422 with `field: null` and
    a message naming nothing ("Extra inputs are not permitted")."""
    group = api.create("ip_addr_groups", {"name": "g"})
    for method, url in (
        ("PATCH", f"/v1/ip_addr_groups/{group['id']}"),
        ("POST", "/v1/ip_addr_groups"),
    ):
        response = api.request(method, url, json={"ç\x13y«G": 1, "": 2})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert sorted(d["field"] for d in error["details"]) == ["", "ç\x13y«G"], error
        assert "unknown field 'ç\\x13y«G'" in error["message"], error["message"]
        assert "unknown field ''" in error["message"], error["message"]
