"""Model-derived options and `--set` parsing, and the registry of sub-apps (agent, lab)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivenet.cli import plugins
from hivenet.cli.fields import (
    KIND_OPTIONS,
    OptionValueError,
    field_help,
    model_for,
    parse_assignments,
    parse_port_range,
)
from hivenet.model import KINDS
from tests.integration.cli.conftest import Hivenet


def test_every_option_names_a_real_field_of_its_kind() -> None:
    assert set(KIND_OPTIONS) == set(KINDS)
    for kind, options in KIND_OPTIONS.items():
        for option in options:
            assert option.field in KINDS[kind].model_fields, (kind, option.field)


@pytest.mark.parametrize(
    ("kind", "assignment", "expected"),
    [
        ("port", "vlan_id=10", 10),
        ("port", "peer_id=null", None),
        ("port", "name=123", "123"),  # a name is text even when it looks like JSON
        ("port", "name=null", "null"),
        ("port", 'addresses=["10.0.0.1/24"]', ["10.0.0.1/24"]),
        ("port", "mac=02:00:00:00:00:01", "02:00:00:00:00:01"),
        ("rule", 'tp_dst={"start": 1, "end": 2}', {"start": 1, "end": 2}),
        ("rule", "match_return_flow=true", True),
        ("rule", "dl_type=2048", 2048),
        ("route", "next_hop_gateway=10.0.0.1", "10.0.0.1"),
        ("tunnel_zone", "vxlan-port=4790", 4790),
    ],
)
def test_set_parses_json_when_the_field_takes_it(
    kind: str, assignment: str, expected: object
) -> None:
    field_name = assignment.split("=", 1)[0].replace("-", "_")
    assert parse_assignments(model_for(kind), [assignment]) == {field_name: expected}


def test_set_rejects_unknown_and_repeated_fields() -> None:
    with pytest.raises(OptionValueError, match="has no field 'nope'"):
        parse_assignments(model_for("bridge"), ["nope=1"])
    with pytest.raises(OptionValueError, match="given twice"):
        parse_assignments(model_for("bridge"), ["name=a", "name=b"])


def test_port_range_forms() -> None:
    assert parse_port_range("80") == {"start": 80, "end": 80}
    assert parse_port_range(" 1000-2000 ") == {"start": 1000, "end": 2000}
    with pytest.raises(OptionValueError, match="PORT or START-END"):
        parse_port_range("http")


def test_help_is_derived_from_the_model() -> None:
    assert "MAC address" in field_help(model_for("port"), "mac")
    assert "(a port)" in field_help(model_for("route"), "next_hop_port_id")
    assert "required on create" in field_help(model_for("rule"), "chain_id")
    assert "default 4789" in field_help(model_for("tunnel_zone"), "vxlan_port")
    assert "normal|blackhole|reject" in field_help(model_for("route"), "type")


def test_every_kind_has_the_five_verbs_in_help() -> None:
    hivenet = Hivenet()
    root_help = hivenet.ok("--help").stdout
    for kind in KINDS:
        command = kind.replace("_", "-")
        assert command in root_help
        group_help = hivenet.ok(command, "--help").stdout
        for verb in ("create", "list", "show", "update", "delete"):
            assert verb in group_help, (command, verb)
    assert "--next-hop-port" in hivenet.ok("route", "create", "--help").stdout


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    package = tmp_path / "hn_test_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "greeter.py").write_text(
        "import typer\n"
        "app = typer.Typer(help='Say hello.')\n"
        "@app.command()\n"
        "def hello(name: str) -> None:\n"
        "    typer.echo(f'hello {name}')\n"
        "@app.command()\n"
        "def bye() -> None:\n"
        "    typer.echo('bye')\n"
    )
    (package / "broken.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in list(sys.modules):
        if name.startswith("hn_test_plugins"):
            del sys.modules[name]


def test_registered_subapp_is_loaded_on_demand(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(plugins.SUBAPP_SOURCES, "greet", "hn_test_plugins.greeter:app")
    monkeypatch.setitem(plugins.SUBAPP_SOURCES, "ghost", "hn_test_plugins.missing:app")
    hivenet = Hivenet()
    assert hivenet.ok("greet", "hello", "hive").stdout == "hello hive\n"
    root_help = hivenet.ok("--help").stdout
    assert "greet" in root_help
    assert "ghost" in root_help and "unavailable: ModuleNotFoundError" in root_help
    missing = hivenet.fails("ghost", "anything")
    assert "failed to load from hn_test_plugins.missing:app" in missing.stderr


def test_broken_subapp_does_not_break_the_rest(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(plugins.SUBAPP_SOURCES, "broken", "hn_test_plugins.broken:app")
    hivenet = Hivenet()
    result = hivenet.fails("broken", "anything")
    assert "failed to load" in result.stderr and "half-written module" in result.stderr
    assert "broken" in hivenet.ok("--help").stdout
    hivenet.ok("config", "show")


def test_register_subapp_source_checks_the_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins, "SUBAPP_SOURCES", dict(plugins.SUBAPP_SOURCES))
    with pytest.raises(ValueError, match=r"package\.module:attribute"):
        plugins.register_subapp_source("x", "no_colon_here")
    plugins.register_subapp_source("x", "some.module:app")
    assert plugins.SUBAPP_SOURCES["x"] == "some.module:app"
