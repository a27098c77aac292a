"""HiveNet api package."""
