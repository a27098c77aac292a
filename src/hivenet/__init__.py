"""HiveNet: distributed L2-L4 network virtualization (simulate at the edge)."""

__version__ = "0.1.0"
