"""`hivenet agent run --datapath ebpf` where the kernel side cannot load: one line on stderr
saying why, and the agent runs on the userspace datapath; where it loads, the eBPF one (the
default)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from hivenet.agent.cli import _start_host_datapath, run
from hivenet.datapath.ebpf.datapath import EbpfDatapath
from hivenet.datapath.ebpf.kernel import FastPathUnavailable, KernelFastPath
from hivenet.datapath.userspace import UserspaceDatapath
from tests.unit.datapath.ebpf.kernel_fake import FakeKernel


def start(kind: str) -> object:
    async def run() -> object:
        datapath = _start_host_datapath(kind, None, 4789)
        datapath.close()  # type: ignore[attr-defined]
        return datapath

    return asyncio.run(run())


def test_ebpf_falls_back_to_userspace_with_one_line_saying_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(_self: KernelFastPath) -> None:
        raise FastPathUnavailable("needs root (BPF programs and tc filters)")

    monkeypatch.setattr(KernelFastPath, "setup", refuse)
    datapath = start("ebpf")
    assert type(datapath) is UserspaceDatapath
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "ebpf datapath unavailable (needs root (BPF programs and tc filters)); using userspace"
    ]


def test_ebpf_is_used_where_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKernel(with_tunnel=False)
    monkeypatch.setattr(
        "hivenet.datapath.ebpf.kernel.KernelFastPath", lambda *_args, **_kwargs: fake
    )
    datapath = start("ebpf")
    assert isinstance(datapath, EbpfDatapath)
    assert fake.set_up and fake.closed


def test_ebpf_is_the_default_of_agent_run_and_userspace_a_choice() -> None:
    assert inspect.signature(run).parameters["datapath"].default == "ebpf"
    assert type(start("userspace")) is UserspaceDatapath
