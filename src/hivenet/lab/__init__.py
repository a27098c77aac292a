"""HiveNet lab package."""
