"""`portblocks._PortSet` (pairs as bits of 64-bit words) against a plain set of ints."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.flowstate.portblocks import _PortSet

# Pairs around word and address boundaries: ip << 16 | port with a few ips and ports.
pairs = st.builds(
    lambda ip, port: ip << 16 | port,
    st.sampled_from([0, 1, 0xCB007102, 0xFFFFFFFF]),
    st.one_of(st.integers(0, 200), st.integers(0xFF80, 0xFFFF)),
)
operations = st.lists(
    st.tuples(st.sampled_from(["add", "discard", "range"]), pairs, st.integers(0, 100))
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_port_set_is_a_set(ops: list[tuple[str, int, int]]) -> None:
    ports, model = _PortSet(), set()
    for op, pair, span in ops:
        if op == "add":
            ports.add(pair)
            model.add(pair)
        elif op == "discard":
            ports.discard(pair)
            model.discard(pair)
        else:
            ports.remove_range(pair, pair + span)
            model -= {p for p in model if pair <= p <= pair + span}
        assert len(ports) == len(model)
        assert bool(ports) == bool(model)
        assert sorted(ports) == sorted(model)
        assert (pair in ports) == (pair in model)
        assert (pair + 1 in ports) == (pair + 1 in model)
    assert all(word for word in ports._words.values())  # no empty word left behind
