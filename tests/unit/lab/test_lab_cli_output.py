"""What `hivenet lab status` and the "Explore" hints show, on a planned lab (no root needed):
drops by reason per host, the API server not counted as a namespace, and one hint block that
`hivenet lab up` and the demo both print."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from hivenet import demo
from hivenet.lab import cli as lab_cli
from hivenet.lab.lab import Lab, LabStatus, ProcessStatus
from hivenet.lab.netns import LabScope
from hivenet.lab.scenario import builtin_scenario

COUNTERS_H1 = {
    "revision": 7,
    "pipeline": {"upcalls": 12, "drop.no_route": 2},
    "datapath": {"flows": 4, "drop.malformed_frame": 24420, "drop.flow_drop": 0},
    "agent": {"flows_invalidated": 0},
}


def planned_lab(tmp_path: Path, *, scenario: str = "default") -> Lab:
    lab = Lab(builtin_scenario(scenario), state_dir=tmp_path / "state", scope=LabScope("t3st"))
    lab.record.api_url = "http://127.0.0.1:1"
    lab.record.phase = "up"
    return lab


def rendered(lab: Lab, report: LabStatus) -> str:
    output = io.StringIO()
    lab_cli.print_status(lab, report, Console(file=output, width=200))
    return output.getvalue()


def status_of(lab: Lab) -> LabStatus:
    return LabStatus(
        phase="up",
        api_url=lab.record.api_url,
        api_healthy=True,
        namespaces={name: True for name in lab.plan.namespaces()},
        processes=[
            ProcessStatus(lab.plan.api_namespace, "serve", 10, True),
            ProcessStatus(lab.plan.host("h1").namespace, "agent", 11, True),
        ],
        agents={"h1": COUNTERS_H1, "h2": {"datapath": {"flows": 1}}, "h3": None},
    )


def test_status_shows_drops_by_reason_per_host(tmp_path: Path) -> None:
    lab = planned_lab(tmp_path)
    text = rendered(lab, status_of(lab))
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines()]
    assert ["h1", "datapath", "malformed_frame", "24420"] in rows
    assert ["h1", "pipeline", "no_route", "2"] in rows
    assert "flow_drop" not in text  # zero counters are not drops
    assert lab_cli.drops_by_reason(COUNTERS_H1) == {
        "datapath malformed_frame": 24420,
        "pipeline no_route": 2,
    }
    assert lab_cli.drops_by_reason(None) == {}
    quiet = status_of(lab)
    quiet.agents["h1"] = {"datapath": {"flows": 1}}
    assert "drops by reason: none" in rendered(lab, quiet)


def test_status_counts_only_real_namespaces_and_shows_the_api_in_the_root_one(
    tmp_path: Path,
) -> None:
    lab = planned_lab(tmp_path)
    text = rendered(lab, status_of(lab))
    assert lab.plan.api_namespace not in text
    assert "root namespace │ serve" in text
    assert "namespaces: 7/7 present" in text  # 3 hosts + 4 VMs; the API server is no namespace
    assert lab.plan.api_namespace not in lab.plan.namespaces()


@pytest.mark.parametrize("scenario", ["default", "nat"])
def test_lab_up_and_the_demo_print_the_same_hints(tmp_path: Path, scenario: str) -> None:
    lab = planned_lab(tmp_path, scenario=scenario)
    hints = lab_cli.explore_hints(lab)
    up_output, demo_output = io.StringIO(), io.StringIO()
    lab_cli.print_explore_hints(lab, Console(file=up_output, width=300))
    demo._explain(lab, Console(file=demo_output, width=300), teardown=False)
    for hint in hints:
        assert hint.command in up_output.getvalue()
        assert hint.command in demo_output.getvalue()
        if hint.command.startswith("hivenet lab "):
            assert f"--state-dir {lab.state_dir}" in hint.command  # not the default dir
    assert any(" ping -c " in hint.command for hint in hints)
    assert any(hint.command.startswith("hivenet lab stats") for hint in hints)


def test_hints_leave_out_the_default_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVENET_LAB_STATE_DIR", str(tmp_path / "state"))
    lab = planned_lab(tmp_path)
    assert all("--state-dir" not in hint.command for hint in lab_cli.explore_hints(lab))
