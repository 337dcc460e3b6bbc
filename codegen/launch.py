"""Load compiled kernels with the CUDA driver API and launch them on torch's current stream.

A launch marshals host scalars and torch data pointers and calls cuLaunchKernel: no host sync
and no device allocation, so a sequence of launches can be captured in a CUDA graph. Scratch
buffers are the caller's (see kernels.decode_scratch).
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch
from cuda.bindings import driver

from .nvrtc import compile_for_device
from .render import KernelSource, render

DEFAULT_SMEM_LIMIT = 48 * 1024  # beyond it a function must opt in to more dynamic shared memory


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed."""


def check(result, what: str):
    err = result[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        _, text = driver.cuGetErrorString(err)
        raise CudaDriverError(f"{what} failed: {name.decode() if name else err}: {text.decode() if text else ''}")
    return result[1] if len(result) == 2 else None


# Kernel argument helpers: (value, ctypes type) pairs as cuLaunchKernel's kernelParams wants them.
def ptr(t: torch.Tensor | None):
    return (t.data_ptr() if t is not None else 0, ctypes.c_void_p)


def i32(x: int):
    return (int(x), ctypes.c_int)


def i64(x: int):
    return (int(x), ctypes.c_longlong)


def f32(x: float):
    return (float(x), ctypes.c_float)


_init_lock = threading.Lock()
_initialized = False


def _ensure_context(device: torch.device) -> None:
    """Make torch's primary context current on this thread (torch normally already has)."""
    global _initialized
    with _init_lock:
        if not _initialized:
            check(driver.cuInit(0), "cuInit")
            _initialized = True
    torch.cuda.init()
    torch.empty(1, device=device)  # forces torch's lazy context creation on this device
    ctx = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is None or int(ctx) == 0:
        dev = check(driver.cuDeviceGet(device.index), "cuDeviceGet")
        ctx = check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class LoadedKernel:
    """One KernelSource compiled for a device and loaded there."""

    def __init__(self, source: KernelSource, device: torch.device):
        self.source = source
        self.device = device
        props = torch.cuda.get_device_properties(device)
        self.num_sms = props.multi_processor_count
        image = compile_for_device(source.source, source.name, (props.major, props.minor), source.origin)
        data = image.data if image.kind == "cubin" else image.data.rstrip(b"\0") + b"\0"
        # Loaded into the device's primary context, which torch makes current for its work there.
        with torch.cuda.device(device):
            _ensure_context(device)
            self.module = check(driver.cuModuleLoadData(data), f"cuModuleLoadData({source.name})")
            self.functions = {
                e: check(driver.cuModuleGetFunction(self.module, e.encode()), f"cuModuleGetFunction({e})")
                for e in source.entries
            }
        self._smem_opt_in: dict[str, int] = {}
        self._occupancy: dict = {}

    def _opt_in(self, entry: str, smem: int):
        f = self.functions[entry]
        if smem > DEFAULT_SMEM_LIMIT and self._smem_opt_in.get(entry, 0) < smem:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(driver.cuFuncSetAttribute(f, attr, smem), f"cuFuncSetAttribute({entry}, smem={smem})")
            self._smem_opt_in[entry] = smem
        return f

    def blocks_per_sm(self, entry: str, threads: int, smem: int = 0) -> int:
        """How many blocks of `entry` fit on one SM at once (registers, shared memory, threads)."""
        key = (entry, threads, smem)
        if key not in self._occupancy:
            f = self._opt_in(entry, smem)
            n = check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(f, threads, smem),
                      f"cuOccupancyMaxActiveBlocksPerMultiprocessor({entry})")
            self._occupancy[key] = max(1, int(n))
        return self._occupancy[key]

    def launch(self, entry: str, grid, block, args, smem: int = 0) -> None:
        f = self._opt_in(entry, smem)
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        if gx == 0 or gy == 0 or gz == 0:
            return  # nothing to do (an empty batch)
        bx, by, bz = (tuple(block) + (1, 1))[:3]
        stream = driver.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        values = tuple(a[0] for a in args)
        types = tuple(a[1] for a in args)
        check(
            driver.cuLaunchKernel(f, gx, gy, gz, bx, by, bz, smem, stream, (values, types), 0),
            f"cuLaunchKernel({entry}, grid={grid}, block={block}, smem={smem})",
        )


    def launcher(self, pdl: bool):
        """`launch_dependent` when pdl, else `launch` (the launch wrappers' pdl argument)."""
        return self.launch_dependent if pdl else self.launch

    def launch_dependent(self, entry: str, grid, block, args, smem: int = 0) -> None:
        """`launch` with programmatic stream serialization (PDL): the kernel may start while the one
        before it drains; its `griddepcontrol.wait` guards what that one writes. KILN_PDL=0, or a
        driver that refuses it, gives plain launches."""
        dev = self.device.index
        if os.environ.get("KILN_PDL", "1") == "0" or dev in _pdl_refused:
            self.launch(entry, grid, block, args, smem)
            return
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        if gx == 0 or gy == 0 or gz == 0:
            return
        err = self._launch_ex(entry, grid, block, args, smem,
                              _ATTR.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                              "programmaticStreamSerializationAllowed")
        if err == driver.CUresult.CUDA_ERROR_NOT_SUPPORTED and not torch.cuda.is_current_stream_capturing():
            _pdl_refused.add(dev)  # an older driver: plain launches from now on
            self.launch(entry, grid, block, args, smem)
            return
        check((err,), f"cuLaunchKernelEx({entry}, grid={grid}, smem={smem}, programmatic serialization)")

    def launch_cooperative(self, entry: str, grid, block, args, smem: int = 0) -> None:
        """`launch` as a cooperative grid: every block resident at once (the driver refuses a grid that does not fit),
        so that the kernel's blocks may wait for each other (a grid barrier). Captured in a CUDA graph like any."""
        check((self._launch_ex(entry, grid, block, args, smem, _ATTR.CU_LAUNCH_ATTRIBUTE_COOPERATIVE, "cooperative"),),
              f"cuLaunchKernelEx({entry}, grid={grid}, smem={smem}, cooperative)")

    def _launch_ex(self, entry: str, grid, block, args, smem: int, attribute, field: str):
        """cuLaunchKernelEx on torch's current stream with one launch attribute (a CUlaunchAttributeID), its value's
        `field` (the union member that attribute reads) set to 1; the driver's result code."""
        f = self._opt_in(entry, smem)
        cfg = driver.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = (tuple(grid) + (1, 1))[:3]
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = (tuple(block) + (1, 1))[:3]
        cfg.sharedMemBytes = smem
        cfg.hStream = driver.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        attr = driver.CUlaunchAttribute()
        attr.id = attribute
        setattr(attr.value, field, 1)
        cfg.attrs = [attr]
        cfg.numAttrs = 1
        values = tuple(a[0] for a in args)
        types = tuple(a[1] for a in args)
        return driver.cuLaunchKernelEx(cfg, f, (values, types), 0)[0]

_ATTR = driver.CUlaunchAttributeID
_pdl_refused: set = set()  # devices whose driver refused a programmatic launch
_loaded: dict = {}
_loaded_lock = threading.Lock()


def get_kernel(spec, device: torch.device) -> LoadedKernel:
    """The kernel for `spec` on `device`, rendered, compiled and loaded once per process."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (spec, device.index)
    k = _loaded.get(key)
    if k is None:
        with _loaded_lock:
            k = _loaded.get(key)
            if k is None:
                k = LoadedKernel(render(spec), device)
                _loaded[key] = k
    return k
