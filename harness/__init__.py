"""Test and benchmark infrastructure shared by tests/ and bench/ (real daemons on loopback)."""
