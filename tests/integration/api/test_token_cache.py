"""The project-token lookup reads the store on every request; only the decoding of a stored
value is remembered, by its key and mod revision, so revocation and changes hold at once."""

from __future__ import annotations

import asyncio
import datetime as dt

from hivenet.api.auth import Role
from hivenet.api.tokens import TokenInfo, lookup_project_token, token_hash, token_key
from hivenet.store import open_store


def _info(role: Role, project: str = "acme") -> bytes:
    created = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    info = TokenInfo(id="t1", project=project, role=role, created_at=created, created_by="admin")
    return info.model_dump_json().encode()


def test_a_cached_token_is_revoked_and_changed_on_the_next_lookup() -> None:
    async def scenario() -> None:
        store = open_store("memory://")
        other = open_store("memory://")
        try:
            key = token_key(token_hash("secret-1"))
            await store.put(key, _info(Role.MEMBER))
            await other.put(key, _info(Role.READER, project="other"))  # same key and revision
            for _ in range(2):  # the second answer comes from the decode cache
                principal = await lookup_project_token(store, "secret-1")
                assert principal is not None and principal.role is Role.MEMBER
                assert principal.tenant_id == "acme"
            elsewhere = await lookup_project_token(other, "secret-1")
            assert elsewhere is not None and elsewhere.tenant_id == "other"
            await store.put(key, _info(Role.READER))  # a new revision of the same key
            changed = await lookup_project_token(store, "secret-1")
            assert changed is not None and changed.role is Role.READER
            await store.delete(key)  # revoked
            assert await lookup_project_token(store, "secret-1") is None
            assert await lookup_project_token(store, "secret-2") is None
        finally:
            await store.close()
            await other.close()

    asyncio.run(scenario())
