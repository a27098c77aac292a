"""HiveNet REST API: the server (`create_app`, `run_server`) and, in `client.py`, its client.

The server modules (FastAPI, uvicorn) load only when `create_app`/`run_server` are first used,
so importing `hivenet.api.client` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hivenet.api.app import create_app, run_server

__all__ = ["create_app", "run_server"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hivenet.api import app

        return getattr(app, name)
    raise AttributeError(f"module 'hivenet.api' has no attribute {name!r}")
