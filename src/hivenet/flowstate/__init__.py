"""HiveNet flowstate package."""
