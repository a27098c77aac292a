"""HiveNet agent package."""
