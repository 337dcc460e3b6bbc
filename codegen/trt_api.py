"""Which TensorRT is installed: full `tensorrt`, or TensorRT-RTX, chosen at run time.

Both expose the same network-definition API under different module names. TensorRT-RTX
builds ahead of time for named compute capabilities (it needs no GPU to build, but runs
only on the GPUs it targets); full TensorRT builds for the GPU it runs on.
`KILN_TENSORRT=<module>` forces one module.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

from kiln.dsl.dtypes import RUN_DTYPES

# Tried in order. TensorRT-RTX's standalone PyPI wheel installs `tensorrt_rtx_bindings`;
# NVIDIA's own packages name the module `tensorrt_rtx`.
MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
INSTALL_HINT = ("install TensorRT-RTX (pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings, "
                "or Kiln's `tensorrt` extra) or NVIDIA's full `tensorrt`")

# Kiln dtype name -> TensorRT DataType attribute (the one dtype table's `trt` column).
DTYPES = {name: d.trt for name, d in RUN_DTYPES.items()}
# Compute capabilities TensorRT-RTX can target ahead of time, by Kiln's spelling.
RTX_ARCHS = {"sm75": "SM75", "sm80": "SM80", "sm86": "SM86", "sm89": "SM89", "sm120": "SM120", "sm121": "SM121"}
BF16_MIN_SM = 80  # Turing (sm75) has no bfloat16 arithmetic


class TensorRTMissing(Exception):
    """No usable TensorRT Python module; the message says which were tried and why."""


@dataclass(frozen=True)
class TensorRT:
    module: ModuleType
    name: str  # the module name that was imported
    version: str

    @property
    def rtx(self) -> bool:
        return "rtx" in self.name

    @property
    def flavor(self) -> str:
        return "TensorRT-RTX" if self.rtx else "TensorRT"

    def dtype(self, kiln_dtype: str):
        return getattr(self.module, DTYPES[kiln_dtype])

    def has(self, *features: str) -> bool:
        """Whether `INetworkDefinition` (or the module) offers each named feature."""
        net = self.module.INetworkDefinition
        return all(hasattr(net, f) or hasattr(self.module, f) for f in features)


def load_tensorrt(prefer: str | None = None) -> TensorRT:
    """The first importable TensorRT module (or `prefer` / $KILN_TENSORRT only)."""
    wanted = prefer or os.environ.get("KILN_TENSORRT")
    names = (wanted,) if wanted else MODULES
    reasons = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError:
            reasons.append(f"{name}: not installed")
            continue
        except Exception as e:  # noqa: BLE001 - a stub wheel or a broken install raises anything on import
            reasons.append(f"{name}: import failed ({type(e).__name__}: {e})")
            continue
        if not hasattr(mod, "Builder"):
            reasons.append(f"{name}: not a TensorRT module (no Builder)")
            continue
        return TensorRT(mod, name, str(getattr(mod, "__version__", "?")))
    raise TensorRTMissing("no TensorRT Python module is usable (" + "; ".join(reasons) + "); " + INSTALL_HINT)


def arch_number(arch: str) -> int:
    """'sm86' -> 86."""
    return int(arch[2:])
