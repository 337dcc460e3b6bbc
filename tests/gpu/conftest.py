"""GPU tests: skipped as a whole without a CUDA device."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    here = str(config.rootpath / "tests" / "gpu")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU"))


@pytest.fixture
def fresh_seed():
    """Fresh random inputs on every run; the seed is printed (shown on failure) to replay one."""
    seed = int(os.environ.get("KILN_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"KILN_TEST_SEED={seed}")
    torch.manual_seed(seed)
    return seed
