"""The registry of sub-apps that other packages contribute to the `hivenet` command.

`hivenet agent ...` and `hivenet lab ...` are written by the agent and lab packages, which
may not import `hivenet.cli` (layer rule). So the registry pulls instead: each entry of
`SUBAPP_SOURCES` names a module and the `typer.Typer` attribute in it, e.g.
`"lab": "hivenet.lab.cli:app"`. The module is imported only when that sub-command (or the
top-level help) is used, so `hivenet bridge list` never pays for pyroute2. A module that does
not exist yet is simply not offered; one that fails to import is offered as a command that
explains the failure. Code inside `hivenet.cli` may also call `register_subapp_source()`.
Owns nothing else; must not implement any agent or lab command.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import typer
import typer.main
from typer import _click  # the click that typer vendors (typer is pinned)
from typer.core import TyperCommand, TyperGroup

SUBAPP_SOURCES: dict[str, str] = {
    "agent": "hivenet.agent.cli:app",
    "lab": "hivenet.lab.cli:app",
}


def register_subapp_source(name: str, source: str) -> None:
    """Offer `hivenet <name> ...` from the `typer.Typer` at `source` ("package.module:attr")."""
    module_name, sep, attribute = source.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"sub-app source {source!r}: expected 'package.module:attribute'")
    SUBAPP_SOURCES[name] = source


def _module_exists(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def available_subapps() -> list[str]:
    return [name for name, source in SUBAPP_SOURCES.items() if _module_exists(source.split(":")[0])]


def _unavailable_command(name: str, source: str, error: BaseException) -> _click.Command:
    reason = f"{type(error).__name__}: {error}"

    def explain() -> None:
        raise _click.ClickException(f"the '{name}' commands failed to load from {source}: {reason}")

    return TyperCommand(
        name,
        callback=explain,
        help=f"(unavailable: {reason})",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def load_subapp(name: str) -> _click.Command | None:
    source = SUBAPP_SOURCES.get(name)
    if source is None:
        return None
    module_name, _, attribute = source.partition(":")
    if not _module_exists(module_name):
        return None
    try:
        module = importlib.import_module(module_name)
        sub_app: Any = getattr(module, attribute)
        if not isinstance(sub_app, typer.Typer):
            raise TypeError(f"{source} is a {type(sub_app).__name__}, not a typer.Typer")
        command = typer.main.get_command(sub_app)
    except Exception as exc:  # a broken plugin must not break the rest of the CLI
        return _unavailable_command(name, source, exc)
    command.name = name
    return command


class PluginGroup(TyperGroup):
    """The root command group: built-in commands plus the registered sub-apps, loaded lazily."""

    def list_commands(self, ctx: _click.Context) -> list[str]:
        names = list(super().list_commands(ctx))
        return names + [name for name in available_subapps() if name not in names]

    def get_command(self, ctx: _click.Context, cmd_name: str) -> _click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            command = load_subapp(cmd_name)
            if command is not None:
                self.add_command(command, cmd_name)
        return command
