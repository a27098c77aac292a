"""HiveNet store package."""
