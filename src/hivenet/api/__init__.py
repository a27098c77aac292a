"""HiveNet REST API: the server (`create_app`, `run_server`) and, in `client.py`, its client.

The server modules (FastAPI, uvicorn) load only when `create_app`/`run_server` are first used,
so importing `hivenet.api.client` stays light. The default request body limit lives here for
the same reason (the CLI shows it without loading the server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hivenet.api.app import create_app, run_server

__all__ = ["create_app", "run_server"]

# 1 MiB. Neutron's default (`max_request_body_size`) is 114688 bytes, but the largest body
# HiveNet's own model accepts is bigger: a port's metadata may carry 64 KiB of user_data
# (`model.types.USER_DATA_MAX`, JSON escaping can double it) and 16 SSH keys of up to 16 KiB,
# about 400 KiB in all; a Neutron bulk create or a security group with hundreds of rules adds
# more. 1 MiB takes all of those with room to spare and still bounds what one request makes
# the server parse (a few tens of MiB of Python objects at most).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024  # `hivenet serve --max-body-bytes`, bodylimit.py
# Per client (token, else address) and API server process: `hivenet serve --rate-limit
# --rate-burst`, ratelimit.py. Far above what a person, the CLI or an OpenStack client does
# (a few requests per command); a script looping on the API is slowed, not the server.
DEFAULT_RATE_LIMIT = 100.0
DEFAULT_RATE_BURST = 200


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hivenet.api import app

        return getattr(app, name)
    raise AttributeError(f"module 'hivenet.api' has no attribute {name!r}")
