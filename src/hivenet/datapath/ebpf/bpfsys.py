"""A small ctypes shim over the bpf(2) syscall: the map and test-run commands the eBPF datapath
needs at run time, nothing else.

Owns: pinned-object lookup (BPF_OBJ_GET), map element lookup / update / delete / key walk, a
batch dump of a hash map (BPF_MAP_LOOKUP_BATCH), and BPF_PROG_TEST_RUN (the tests run the programs on frames built in Python). Loading programs and
attaching them is not here: `bpftool` (loader) and `tc` (attach) do that (see `kernel.py`).

Why a shim rather than a binding: the map operations run on the agent's event loop for every
offloaded flow, so a subprocess per call (bpftool map update) is far too slow, and Debian ships
no maintained Python binding of libbpf. The attr layouts are the stable UAPI of linux/bpf.h.
Must not touch: anything but the file descriptors it is handed or opens from a pinned path.
"""

from __future__ import annotations

import ctypes
import os
import platform

_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_MAP_LOOKUP_BATCH = 24

BPF_ANY = 0


class BpfError(OSError):
    """A bpf(2) call failed; errno and the command name are in the message."""


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(command: int, attr: ctypes.Structure, name: str) -> int:
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        raise BpfError(0, f"bpf({name}): no syscall number known for {platform.machine()}")
    result = int(
        _libc.syscall(
            ctypes.c_long(number),
            ctypes.c_int(command),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
    )
    if result < 0:
        error = ctypes.get_errno()
        raise BpfError(error, f"bpf({name}): {os.strerror(error)}")
    return result


def _address(buffer: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buffer)


def object_get(path: str) -> int:
    """A new file descriptor of the program or map pinned at `path` (close it when done)."""
    encoded = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjGetAttr(pathname=_address(encoded))
    return _bpf(BPF_OBJ_GET, attr, f"OBJ_GET {path}")


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value, len(value))
    attr = _MapElemAttr(
        map_fd=map_fd, key=_address(key_buffer), value=_address(value_buffer), flags=BPF_ANY
    )
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "MAP_UPDATE_ELEM")


def map_delete(map_fd: int, key: bytes) -> bool:
    """Delete one element; False when it was not there (ENOENT)."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    attr = _MapElemAttr(map_fd=map_fd, key=_address(key_buffer))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr, "MAP_DELETE_ELEM")
    except BpfError as error:
        if error.errno == 2:
            return False
        raise
    return True


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under `key`, None when there is none."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value_size)
    attr = _MapElemAttr(map_fd=map_fd, key=_address(key_buffer), value=_address(value_buffer))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, "MAP_LOOKUP_ELEM")
    except BpfError as error:
        if error.errno == 2:
            return None
        raise
    return value_buffer.raw


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """Every key of the map (a snapshot; entries may come and go meanwhile)."""
    keys: list[bytes] = []
    next_buffer = ctypes.create_string_buffer(key_size)
    attr = _MapElemAttr(map_fd=map_fd, key=0, value=_address(next_buffer))
    while True:
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, "MAP_GET_NEXT_KEY")
        except BpfError as error:
            if error.errno == 2:
                return keys
            raise
        keys.append(next_buffer.raw)
        # `current` lives until the next iteration's call has read it.
        current = ctypes.create_string_buffer(next_buffer.raw, key_size)
        attr.key = _address(current)


def map_dump(map_fd: int, key_size: int, value_size: int, batch: int = 4096) -> tuple[bytes, bytes]:
    """Every key and value of a hash map in a few BPF_MAP_LOOKUP_BATCH calls (one syscall per
    `batch` entries instead of one per entry; a snapshot, entries may come and go meanwhile):
    (the keys back to back, the values back to back, in the same order)."""
    keys_out: list[bytes] = []
    values_out: list[bytes] = []
    # The batch cursor is opaque (a bucket index for hash maps); key-sized is always enough.
    cursor_in = ctypes.create_string_buffer(max(8, key_size))
    cursor_out = ctypes.create_string_buffer(max(8, key_size))
    first = True
    while True:
        keys = ctypes.create_string_buffer(key_size * batch)
        values = ctypes.create_string_buffer(value_size * batch)
        attr = _BatchAttr(
            in_batch=0 if first else _address(cursor_in),
            out_batch=_address(cursor_out),
            keys=_address(keys),
            values=_address(values),
            count=batch,
            map_fd=map_fd,
        )
        done = False
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, attr, "MAP_LOOKUP_BATCH")
        except BpfError as error:
            if error.errno == 28:  # ENOSPC: one bucket holds more than `batch` entries
                batch *= 2
                continue
            if error.errno != 2:  # ENOENT: the last batch (`count` says how many it holds)
                raise
            done = True
        keys_out.append(keys.raw[: attr.count * key_size])
        values_out.append(values.raw[: attr.count * value_size])
        if done:
            return b"".join(keys_out), b"".join(values_out)
        ctypes.memmove(cursor_in, cursor_out, len(cursor_out))
        first = False


def prog_test_run(
    prog_fd: int, frame: bytes, *, context: bytes = b"", out_size: int = 65536
) -> tuple[int, bytes]:
    """Run a program once on `frame` (BPF_PROG_TEST_RUN): (return value, frame after it)."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(out_size)
    context_in = ctypes.create_string_buffer(context, len(context)) if context else None
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_size_out=out_size,
        data_in=_address(data_in),
        data_out=_address(data_out),
        repeat=1,
    )
    if context_in is not None:
        attr.ctx_in = _address(context_in)
        attr.ctx_size_in = len(context)
    _bpf(BPF_PROG_TEST_RUN, attr, "PROG_TEST_RUN")
    return attr.retval, data_out.raw[: attr.data_size_out]
