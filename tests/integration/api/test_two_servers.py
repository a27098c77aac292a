"""Two API servers on one store file: writes from both are serialized by store transactions,
no update is lost under concurrent edits (If-Match), tunnel keys stay unique."""

from __future__ import annotations

import threading

from .conftest import Api


def _in_parallel(*calls: object) -> list[object]:
    results: list[object] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(index: int, call: object) -> None:
        barrier.wait()
        results[index] = call()  # type: ignore[operator]

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_each_server_sees_the_others_writes(two_servers: tuple[Api, Api]) -> None:
    first, second = two_servers
    bridge = first.create("bridges", {"name": "made-by-first"})
    got = second.request("GET", f"/v1/bridges/{bridge['id']}")
    assert got.status_code == 200 and got.json()["name"] == "made-by-first"


def test_concurrent_if_match_updates_from_two_servers_lose_nothing(
    two_servers: tuple[Api, Api],
) -> None:
    first, second = two_servers
    bridge = first.create("bridges", {"name": "b"})
    etag = first.request("GET", f"/v1/bridges/{bridge['id']}").headers["ETag"]
    for round_number in range(10):

        def patch(api: Api, name: str, if_match: str = etag) -> object:
            return lambda: api.request(
                "PATCH",
                f"/v1/bridges/{bridge['id']}",
                json={"name": name},
                headers={"If-Match": if_match},
            )

        responses = _in_parallel(
            patch(first, f"first-{round_number}"), patch(second, f"second-{round_number}")
        )
        codes = sorted(r.status_code for r in responses)  # type: ignore[attr-defined]
        assert codes == [200, 412], [r.text for r in responses]  # type: ignore[attr-defined]
        winner = next(r for r in responses if r.status_code == 200)  # type: ignore[attr-defined]
        now = second.request("GET", f"/v1/bridges/{bridge['id']}")
        assert now.json()["name"] == winner.json()["name"]  # the accepted write is what is stored
        etag = now.headers["ETag"]


def test_ports_created_through_two_servers_get_unique_tunnel_keys(
    two_servers: tuple[Api, Api],
) -> None:
    first, second = two_servers
    bridge = first.create("bridges", {"name": "b"})

    def create_many(api: Api) -> list[int]:
        return [
            api.create("ports", {"device_kind": "bridge", "device_id": bridge["id"]})["tunnel_key"]
            for _ in range(15)
        ]

    keys_first, keys_second = _in_parallel(lambda: create_many(first), lambda: create_many(second))
    keys = [*keys_first, *keys_second]  # type: ignore[misc]
    assert len(keys) == 30 and len(set(keys)) == 30
    first.assert_consistent()
