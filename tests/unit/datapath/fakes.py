"""Socket and event-loop fakes that run `UserspaceDatapath` in-process, without root.

`ReplaySocket` stands for a port's AF_PACKET socket, `RecordingUdpSocket` for the VXLAN socket,
`FakeLoop` for the asyncio loop the datapath registers its readers and expiry timer with (the
test calls the registered reader itself). Used by the fast-path tests and the datapath contract.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

from hivenet.packets import build_udp_datagram

_file_numbers = itertools.count(1000)
MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


def udp_frame(src_port: int = 1000, payload: bytes = b"x" * 18, eth_dst: str = MAC_B) -> bytes:
    """A small UDP frame from 10.0.0.1 (MAC_A) to 10.0.0.2, varied by source port."""
    return build_udp_datagram(
        eth_src=MAC_A,
        eth_dst=eth_dst,
        ip_src="10.0.0.1",
        ip_dst="10.0.0.2",
        src_port=src_port,
        dst_port=9,
        payload=payload,
    )


class _FakeSocket:
    """A file number for the fake loop, and `close` remembered."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.closed = False
        self._fileno = next(_file_numbers)

    def fileno(self) -> int:
        return self._fileno

    def close(self) -> None:
        self.closed = True


class ReplaySocket(_FakeSocket):
    """`recv_into` hands out the queued packets, then raises BlockingIOError; `send` keeps a
    copy of what was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def recv_into(self, buffer: bytearray) -> int:
        if not self.queue:
            raise BlockingIOError
        packet = self.queue.pop(0)
        buffer[: len(packet)] = packet
        return len(packet)

    def send(self, packet: bytes | memoryview) -> int:
        self.sent.append(bytes(packet))
        return len(packet)


class RecordingUdpSocket(_FakeSocket):
    """The VXLAN socket: records every send with its address (GSO trains with their segment
    size) and replays queued datagrams to `recvmsg`."""

    def __init__(self) -> None:
        super().__init__()
        self.datagrams: list[tuple[bytes, int]] = []  # (payload, GSO segment size or 0)
        self.addresses: list[tuple[str, int]] = []
        self.sources: list[tuple[str, int]] = []  # of queued datagrams, when a test gives them

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        self.datagrams.append((bytes(data), 0))
        self.addresses.append(address)
        return len(data)

    def sendmsg(
        self,
        buffers: list[bytes],
        ancillary: list[tuple[int, int, bytes]],
        _flags: int,
        address: tuple[str, int],
    ) -> int:
        segment_size = struct.unpack("=H", ancillary[0][2])[0] if ancillary else 0
        data = b"".join(buffers)
        self.datagrams.append((data, segment_size))
        self.addresses.append(address)
        return len(data)

    def recvmsg(self, _size: int, _ancillary_size: int) -> tuple[bytes, list[Any], int, Any]:
        if not self.queue:
            raise BlockingIOError
        # The source of each queued datagram, when the test gave one (`sources`, in order).
        source = self.sources.pop(0) if self.sources else ("127.0.0.2", 4789)
        return self.queue.pop(0), [], 0, source

    def split(self) -> list[bytes]:
        """Every VXLAN datagram sent, GSO trains cut apart as the kernel would."""
        result: list[bytes] = []
        for data, segment_size in self.datagrams:
            size = segment_size or len(data)
            result += [data[start : start + size] for start in range(0, len(data), size)]
        return result

    def split_with_addresses(self) -> list[tuple[tuple[str, int], bytes]]:
        result: list[tuple[tuple[str, int], bytes]] = []
        for (data, segment_size), address in zip(self.datagrams, self.addresses, strict=True):
            size = segment_size or len(data)
            result += [(address, data[start : start + size]) for start in range(0, len(data), size)]
        return result


class _TimerHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The part of an asyncio loop the datapath uses: readers by file number, timers that
    never fire by themselves."""

    def __init__(self) -> None:
        self.readers: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}

    def add_reader(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self.readers[fd] = (callback, args)

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def call_later(self, _delay: float, _callback: Callable[[], None]) -> _TimerHandle:
        return _TimerHandle()

    def readable(self, fd: int) -> None:
        """The socket with file number `fd` has data: run its reader as the loop would."""
        callback, args = self.readers[fd]
        callback(*args)
