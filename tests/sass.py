"""Where tests find nvdisasm, which reads the SASS of the kernels NVRTC compiles for sm_90a on this CPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def nvdisasm() -> str | None:
    """$NVDISASM, else nvdisasm from the nvidia-cuda-nvdisasm wheel (a dev dependency), else from PATH; None: none."""
    if os.environ.get("NVDISASM"):
        return os.environ["NVDISASM"]
    try:
        import nvidia
        for root in nvidia.__path__:
            for p in Path(root).glob("cu*/bin/nvdisasm"):
                if os.access(p, os.X_OK):
                    return str(p)
    except ImportError:
        pass
    return shutil.which("nvdisasm")
