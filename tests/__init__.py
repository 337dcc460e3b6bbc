"""Kiln's tests: a package, so that test modules import shared helpers (tests.configs,
tests.server_harness) by name, from any folder of tests, with no change to sys.path."""
