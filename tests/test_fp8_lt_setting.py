"""KILN_FP8_LT's setting on any machine (runtime/cuda_lt.py; its GPU behaviour: tests/gpu/test_fp8_lt.py): a row
count or an error naming the variable, and, where nvmath-python is not installed, an error that says what to
install instead of an ImportError's traceback."""

from __future__ import annotations

import importlib.util

import pytest
from kiln.codegen.specs import KernelSpecError
from kiln.runtime import cuda_lt


def test_rows_limit():
    assert cuda_lt.rows_limit("0") == 0 and cuda_lt.rows_limit("512") == 512
    for bad in ("", "on", "-1", "1.5"):
        with pytest.raises(KernelSpecError, match="KILN_FP8_LT"):
            cuda_lt.rows_limit(bad)


@pytest.mark.skipif(importlib.util.find_spec("nvmath") is not None, reason="nvmath-python is installed here")
def test_missing_nvmath_named():
    with pytest.raises(KernelSpecError, match="KILN_FP8_LT=256 needs nvmath-python"):
        cuda_lt.LtPlans(256)
