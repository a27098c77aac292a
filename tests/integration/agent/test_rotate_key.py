"""`hivenet agent rotate-key`: an operator rotates the flow-state key now, whatever its age."""

from __future__ import annotations

import asyncio
from pathlib import Path

from typer.testing import CliRunner

from hivenet.agent.cli import app
from hivenet.agent.underlay import FLOWSTATE_KEYRING_KEY, ensure_keyring
from hivenet.flowstate.auth import Keyring
from hivenet.store import open_store


def stored_keyring(url: str) -> Keyring | None:
    async def read() -> Keyring | None:
        store = open_store(url)
        try:
            stored = await store.get(FLOWSTATE_KEYRING_KEY)
            return None if stored is None else Keyring.from_json(stored.value)
        finally:
            await store.close()

    return asyncio.run(read())


def test_rotate_key_twice_retires_the_first_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hn.db'}"

    async def create() -> Keyring:
        store = open_store(url)
        try:
            return await ensure_keyring(store, 1000.0)  # fresh: a scheduled rotation is not due
        finally:
            await store.close()

    first = asyncio.run(create())
    runner = CliRunner()
    result = runner.invoke(app, ["rotate-key", "--store", url])
    assert result.exit_code == 0, result.output
    assert f"key {(first.current.key_id + 1) % 256} is current" in result.output
    once = stored_keyring(url)
    assert once is not None and once.previous == first.current
    assert once.current.secret != first.current.secret
    assert set(once.receive_keys()) == {first.current.key_id, once.current.key_id}

    assert runner.invoke(app, ["rotate-key", "--store", url]).exit_code == 0
    twice = stored_keyring(url)
    assert twice is not None and twice.previous == once.current
    assert first.current.key_id not in twice.receive_keys()  # the suspect key is gone


def test_rotate_key_without_a_keyring_says_no_agent_has_started(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hn.db'}"
    result = CliRunner().invoke(app, ["rotate-key", "--store", url])
    assert result.exit_code == 1
    assert "no agent has started yet" in result.output
    assert stored_keyring(url) is None  # nothing half-written


def test_rotate_key_with_a_bad_store_url_names_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["rotate-key", "--store", "mysql://nope"])
    assert result.exit_code == 1
    assert "mysql://nope" in result.output
