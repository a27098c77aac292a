"""The flow-action executor: one frame plus a flow's actions in, the frames to send out.

Owns the order semantics of `hivenet.flows.actions`: actions apply in sequence; `SetField`,
`DecTtl`, `PushVlan` and `PopVlan` transform the frame; each `Output`/`Tunnel` emits the frame
as the rewrites before it left it (later rewrites do not change what was already emitted); `Drop`
stops, keeping whatever was emitted before it. An empty action list emits nothing.

Must not touch: sockets, interfaces or VXLAN encapsulation (the datapath sends what this
returns), the clock, or header byte layouts (those are `hivenet.packets.rewrite`'s). A rewrite
that cannot apply to the frame raises that module's `RewriteError` (a ValueError), annotated
with the position of the failing action.
"""

from __future__ import annotations

from collections.abc import Sequence

from hivenet.flows.actions import Action, DecTtl, Drop, Output, PopVlan, PushVlan, SetField, Tunnel
from hivenet.packets.rewrite import dec_ttl, pop_vlan, push_vlan, rewrite_frame

Emission = tuple[Output | Tunnel, bytes]

# isinstance() against tuples: a union written in the call (`Output | Tunnel`) is built
# anew on every call (~0.2 us each, several per action of every packet executed).
_FRAME_TYPES = (bytes, bytearray, memoryview)
_EMITTING = (Output, Tunnel)
_TRANSFORMING = (SetField, DecTtl, PushVlan, PopVlan)


def _transform(frame: bytes, action: SetField | DecTtl | PushVlan | PopVlan) -> bytes:
    if isinstance(action, SetField):
        return rewrite_frame(frame, action.field, action.value)
    if isinstance(action, DecTtl):
        return dec_ttl(frame)
    if isinstance(action, PushVlan):
        return push_vlan(frame, action.vlan)
    return pop_vlan(frame)


def execute_actions(
    frame: bytes | bytearray | memoryview, actions: Sequence[Action]
) -> list[Emission]:
    """Apply `actions` to `frame` in order; returns (Output or Tunnel action, frame) per send."""
    if not isinstance(frame, _FRAME_TYPES):
        raise ValueError(f"frame must be bytes, got {type(frame).__name__}")
    current = bytes(frame)
    emitted: list[Emission] = []
    for position, action in enumerate(actions):
        if isinstance(action, _EMITTING):
            emitted.append((action, current))
        elif isinstance(action, Drop):
            break
        elif isinstance(action, _TRANSFORMING):
            try:
                current = _transform(current, action)
            except ValueError as error:
                error.add_note(f"while executing actions[{position}] = {action!r}")
                raise
        else:
            raise ValueError(f"actions[{position}] is not an Action: {action!r}")
    return emitted
