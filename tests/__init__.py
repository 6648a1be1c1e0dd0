"""pagehaul test suite."""
