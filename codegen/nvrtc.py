"""Compile rendered CUDA source with NVRTC (cuda-python), with an on-disk cache.

`compile_source` turns one kernel source into a cubin for a named arch (`sm_90a`, `sm_80`),
which works with no GPU present; `compile_for_device` picks the running device's arch, and
falls back to PTX (JIT-compiled by the driver) when this NVRTC cannot emit its machine code.
Cache key: sha256 of source + options + NVRTC version + output kind, so a compiler upgrade
or a template change never reuses a stale image. Cache dir: $KILN_CACHE or ~/.cache/kiln/kernels.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cuda.bindings import nvrtc

CONTEXT_LINES = 4  # source lines shown on each side of a compile error
BASE_OPTIONS = ("-std=c++17",)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a generated kernel; the message shows the source around the error."""


class NvrtcError(RuntimeError):
    """An NVRTC API call failed (not a compile error in the source)."""


@dataclass(frozen=True)
class CompiledImage:
    arch: str  # "sm_90a", or "compute_90" for PTX
    kind: str  # "cubin" or "ptx"
    data: bytes
    log: str = ""  # NVRTC's log (warnings, and ptxas' resource report with -Xptxas -v)


def _check(result, what: str):
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise NvrtcError(f"{what} failed: {msg.decode()} ({err})")
    return result[1] if len(result) == 2 else result[1:]


@lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    return tuple(_check(nvrtc.nvrtcVersion(), "nvrtcVersion"))


@lru_cache(maxsize=1)
def supported_archs() -> tuple[int, ...]:
    return tuple(_check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


@lru_cache(maxsize=1)
def cuda_include_dir() -> str:
    """Directory holding cuda_fp16.h / cuda_bf16.h (the nvidia-cuda-runtime wheel or a toolkit)."""
    candidates = []
    if os.environ.get("KILN_CUDA_INCLUDE"):
        candidates.append(os.environ["KILN_CUDA_INCLUDE"])
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            candidates.append(found)
    except Exception:  # pathfinder missing or its lookup failed: try the usual places
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for c in candidates:
        if os.path.isfile(os.path.join(c, "cuda_bf16.h")):
            return c
    raise NvrtcError(
        "cannot find cuda_bf16.h for NVRTC: install the `nvidia-cuda-runtime` wheel "
        "(pip install nvidia-cuda-runtime) or set KILN_CUDA_INCLUDE to a CUDA include dir"
    )


def cache_dir() -> Path:
    d = Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln" / "kernels")
    d.mkdir(parents=True, exist_ok=True)
    return d


def arch_for_capability(major: int, minor: int) -> tuple[str, str]:
    """(arch option, output kind) for a device of compute capability major.minor."""
    cc = major * 10 + minor
    if cc in supported_archs():
        # The `a` variants unlock arch-specific instructions; Hopper is the one we target.
        return (f"sm_{cc}a" if cc == 90 else f"sm_{cc}"), "cubin"
    older = [a for a in supported_archs() if a <= cc]
    if not older:
        raise NvrtcError(f"NVRTC {nvrtc_version()} supports no arch <= sm_{cc}")
    return f"compute_{max(older)}", "ptx"


def _format_error(log: str, source: str, filename: str, origin: str) -> str:
    lines = source.splitlines()
    shown = []
    for m in re.finditer(rf"{re.escape(filename)}\((\d+)\): (?:error|catastrophic error)", log):
        n = int(m.group(1))
        lo, hi = max(1, n - CONTEXT_LINES), min(len(lines), n + CONTEXT_LINES)
        block = [f"{'>' if i == n else ' '}{i:5d} | {lines[i - 1]}" for i in range(lo, hi + 1)]
        shown.append("\n".join(block))
        if len(shown) == 3:
            break
    parts = [f"NVRTC failed to compile kernel {filename!r} (from {origin})", log.strip()]
    if shown:
        parts.append("generated source around the error:\n" + "\n...\n".join(shown))
    return "\n\n".join(parts)


def compile_source(
    source: str, name: str, arch: str = "sm_90a", origin: str = "?", extra_options=()
) -> CompiledImage:
    """Compile to a cubin (`sm_*`) or PTX (`compute_*`) for `arch`; cached on disk."""
    kind = "ptx" if arch.startswith("compute_") else "cubin"
    options = [*BASE_OPTIONS, f"--gpu-architecture={arch}", *extra_options]
    key = hashlib.sha256(
        "\0".join([source, *options, repr(nvrtc_version()), kind]).encode()
    ).hexdigest()[:32]
    path = cache_dir() / f"{name}-{key}.{kind}"
    if path.is_file():
        return CompiledImage(arch, kind, path.read_bytes())

    filename = f"{name}.cu"
    prog = _check(
        nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], []),
        "nvrtcCreateProgram",
    )
    try:
        opts = [o.encode() for o in [*options, f"--include-path={cuda_include_dir()}"]]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log_size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * log_size
        _check((nvrtc.nvrtcGetProgramLog(prog, log)[0], None), "nvrtcGetProgramLog")
        log_text = log.rstrip(b"\0 ").decode(errors="replace")
        if err == nvrtc.nvrtcResult.NVRTC_ERROR_COMPILATION:
            raise KernelCompileError(_format_error(log_text, source, filename, origin))
        _check((err, None), "nvrtcCompileProgram")
        if kind == "cubin":
            size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            data = b" " * size
            _check((nvrtc.nvrtcGetCUBIN(prog, data)[0], None), "nvrtcGetCUBIN")
        else:
            size = _check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            data = b" " * size
            _check((nvrtc.nvrtcGetPTX(prog, data)[0], None), "nvrtcGetPTX")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)

    if not data.strip(b"\0 "):
        raise NvrtcError(f"NVRTC produced an empty {kind} for {name}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: concurrent compiles of one kernel never see half a file
    return CompiledImage(arch, kind, data, log_text)


def compile_for_device(source: str, name: str, capability: tuple[int, int], origin="?"):
    arch, _ = arch_for_capability(*capability)
    return compile_source(source, name, arch, origin)
