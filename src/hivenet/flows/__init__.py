"""HiveNet flows package."""
