"""Tests that need a CUDA GPU (skipped without one: see conftest.py)."""
