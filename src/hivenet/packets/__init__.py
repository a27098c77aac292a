"""HiveNet packets package."""
