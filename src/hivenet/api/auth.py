"""Who is calling: bearer tokens, the admin token file, roles and tenant scoping.

Owns the admin token's life (created on the server's first start as `<state_dir>/admin-token`,
mode 0600, `secrets.token_urlsafe(32)`), the mapping token -> `Principal` (the admin token
from the `TokenRegistry`, project tokens through the resolver `app.state.project_tokens`,
see `api/tokens.py`), the roles, and the FastAPI dependency `authenticate` every protected
route depends on, which also refuses a reader's writes. Routes only ever ask the `Principal`.
Must not touch the store itself.
"""

from __future__ import annotations

import enum
import errno
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hivenet.api.errors import ApiError, detail

ADMIN_TOKEN_FILE = "admin-token"
TOKEN_FILE_MODE = 0o600
_bearer = HTTPBearer(auto_error=False, description="The admin token from <state_dir>/admin-token")


class TokenFileError(Exception):
    """The token file exists but cannot be used safely."""


class Role(enum.StrEnum):
    """What a project token may do in its project (the cluster admin may do everything)."""

    READER = "reader"  # GET only
    MEMBER = "member"  # create, change and delete the project's objects
    ADMIN = "admin"  # member + issue and revoke the project's tokens

    @property
    def rank(self) -> int:
        return _ROLE_RANKS[self]


_ROLE_RANKS = {Role.READER: 0, Role.MEMBER: 1, Role.ADMIN: 2}
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `tenant_id` None means every tenant (the cluster admin,
    whose `role` is always admin); otherwise `role` says what it may do in that tenant."""

    name: str
    tenant_id: str | None
    role: Role = Role.MEMBER

    @property
    def is_admin(self) -> bool:
        """The cluster admin (every project, the infrastructure)."""
        return self.tenant_id is None

    @property
    def may_write(self) -> bool:
        return self.is_admin or self.role is not Role.READER

    def may_access(self, tenant_id: str) -> bool:
        return self.is_admin or self.tenant_id == tenant_id

    def describe(self) -> str:
        """How errors name the caller: 'the cluster admin', 'role reader of project acme'."""
        if self.is_admin:
            return "the cluster admin"
        return f"role {self.role.value} of project {self.tenant_id}"


ADMIN = Principal(name="admin", tenant_id=None, role=Role.ADMIN)
# token -> Principal (None: unknown) for the tokens not in the registry (see api/tokens.py).
ProjectTokenResolver = Callable[[Request, str], Awaitable[Principal | None]]


class TokenRegistry:
    """token -> Principal. Lookups compare in constant time against every known token."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._principals = dict(principals)

    def lookup(self, token: str) -> Principal | None:
        found: Principal | None = None
        for known, principal in self._principals.items():
            if secrets.compare_digest(known.encode(), token.encode()):
                found = principal
        return found


def load_or_create_admin_token(state_dir: Path) -> str:
    """The admin token from `<state_dir>/admin-token`, created (0600) if absent.

    An existing file that others can read is refused: its token may have leaked."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / ADMIN_TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, TOKEN_FILE_MODE)
    except FileExistsError:
        return _read_token_file(path)
    try:
        os.fchmod(fd, TOKEN_FILE_MODE)  # the umask may only have removed bits; be exact
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return token


def _read_token_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TokenFileError(f"token file {path} is a symlink; refusing to use it") from exc
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise TokenFileError(
                f"token file {path} has mode {mode:04o}; others may have read it. "
                f"Delete it (a new token is made on start) or chmod {TOKEN_FILE_MODE:o} it"
            )
        token = handle.read().decode("utf-8", "replace").strip()
    if not token:
        raise TokenFileError(f"token file {path} is empty; delete it to get a new token")
    return token


async def authenticate(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Principal:
    """The caller, from `Authorization: Bearer <token>`; 401 otherwise."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401, "missing bearer token (header 'Authorization: Bearer <token>')", headers=challenge
        )
    registry: TokenRegistry = request.app.state.tokens
    principal = registry.lookup(credentials.credentials)
    if principal is None:
        resolver: ProjectTokenResolver | None = getattr(request.app.state, "project_tokens", None)
        if resolver is not None:
            principal = await resolver(request, credentials.credentials)
    if principal is None:
        raise ApiError(401, "invalid bearer token", headers=challenge)
    if request.method not in READ_METHODS and not principal.may_write:
        raise ApiError(
            403,
            f"role {principal.role.value!r} may only read (GET): {request.method} needs role "
            f"member or admin (this token: {principal.describe()})",
            [detail("role", principal.role.value, "read-only")],
        )
    return principal
