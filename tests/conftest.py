"""Fixtures shared by the CPU tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def fresh_kernel_cache(tmp_path_factory):
    """A module's kernels compiled for real into an empty cache (so ptxas's log, with its spill counts,
    is there to read), not loaded from an earlier run's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_CACHE", str(tmp_path_factory.mktemp("kernels")))
    yield
    mp.undo()
