"""`UpcallBudget`: the token bucket that bounds what one ingress port may ask of flow setup.

Pure (no clock, no I/O): the caller passes `now`. The userspace datapath keeps one per bound
port for its upcalls, so a VM that floods new flows (a SYN flood, broadcast ARP, random UDP)
spends its own budget only and its excess is dropped and counted before it reaches the agent,
while the other ports' upcalls are still simulated; as Open vSwitch's per-port upcall handling
keeps one port from taking every handler thread. The DHCP responder keeps one per port too,
much smaller (`hivenet.sim.dhcp.DhcpBudget`).
"""

from __future__ import annotations

# Far above what a VM's ordinary traffic asks for (each new connection or ARP resolution is one
# upcall; a busy client opens hundreds per second), and of the order of what one agent can
# simulate in total, so one port cannot take it all.
DEFAULT_UPCALL_RATE = 2000.0  # upcalls per second, sustained
DEFAULT_UPCALL_BURST = 2000  # upcalls at once after a quiet spell


class UpcallBudget:
    """`allow(now)` spends one token if there is one; tokens refill at `rate` per second up to
    `burst` (a full bucket to start with). `dropped` counts the refusals."""

    __slots__ = ("burst", "dropped", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate: expected a number > 0, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst: expected an int >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now
        self.dropped = 0

    def allow(self, now: float) -> bool:
        elapsed = now - self.updated
        if elapsed > 0:  # a clock that steps back refills nothing
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.dropped += 1
        return False
