"""HiveNet cli package."""
