"""The registry of sub-apps that other packages contribute to the `hivenet` command.

`hivenet agent ...` and `hivenet lab ...` are written by the agent and lab packages, which
may not import `hivenet.cli` (layer rule). So the registry pulls instead: each entry of
`SUBAPP_SOURCES` names a module and the `typer.Typer` attribute in it, e.g.
`"lab": "hivenet.lab.cli:app"`. The module is imported only when that sub-command (or the
top-level help) is used, so `hivenet bridge list` never pays for pyroute2. A registered
sub-app is always listed: when its module is missing or fails to import, `hivenet --help`
marks it unavailable with the reason and running it exits 1 naming the module and the error
(never hidden, so a broken install is seen at once). Code inside `hivenet.cli` may also call
`register_subapp_source()`. Owns nothing else; must not implement any agent or lab command.
Uses typer's public API only (`typer.core`, `typer.main`), not the click it vendors.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
import typer.main
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


def available_subapps() -> list[str]:
    """Every registered sub-app, loadable or not (a broken one explains itself when used)."""
    return list(SUBAPP_SOURCES)


def _unavailable_command(name: str, source: str, error: BaseException) -> TyperCommand:
    reason = f"{type(error).__name__}: {error}"

    def explain() -> None:
        typer.echo(f"error: the '{name}' commands failed to load from {source}: {reason}", err=True)
        raise typer.Exit(1)

    return TyperCommand(
        name,
        callback=explain,
        help=f"(unavailable: {reason})",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def load_subapp(name: str) -> Any:
    """The command of the registered sub-app `name` (None: nothing registered under it); a
    command that fails with the import error when its module is missing or broken."""
    source = SUBAPP_SOURCES.get(name)
    if source is None:
        return None
    module_name, _, attribute = source.partition(":")
    try:
        module = importlib.import_module(module_name)
        sub_app: Any = getattr(module, attribute)
        if not isinstance(sub_app, typer.Typer):
            raise TypeError(f"{source} is a {type(sub_app).__name__}, not a typer.Typer")
        command = typer.main.get_command(sub_app)
    except Exception as exc:  # shown on use and in --help; the other commands keep working
        return _unavailable_command(name, source, exc)
    command.name = name
    return command


class PluginGroup(TyperGroup):
    """The root command group: built-in commands plus the registered sub-apps, loaded lazily."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = list(super().list_commands(ctx))
        return names + [name for name in available_subapps() if name not in names]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            command = load_subapp(cmd_name)
            if command is not None:
                self.add_command(command, cmd_name)
        return command
