"""Example a2a-sdk executors (plain SDK code, nothing tether-specific)."""
