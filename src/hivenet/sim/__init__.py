"""HiveNet sim package."""
