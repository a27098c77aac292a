"""HiveNet datapath package."""
