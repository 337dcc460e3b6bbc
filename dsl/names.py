"""Identifier validation: names reach generated CUDA and Python, so they are checked first.

A valid name is an ASCII identifier of at most 64 characters that starts with a letter,
has no double underscore (reserved for names Kiln generates) and is no keyword of the
spec language, Python, C++ or CUDA.
"""

from __future__ import annotations

import keyword
import re

from .errors import Pos, SpecError

SPEC_KEYWORDS = frozenset(
    "spec extends architectures gguf ignore param weights block forward return "
    "if else and or not true false none".split())
CXX_KEYWORDS = frozenset(
    "alignas alignof asm auto bool break case catch char class const constexpr const_cast "
    "continue decltype default delete do double dynamic_cast else enum explicit export extern "
    "false float for friend goto if inline int long mutable namespace new noexcept nullptr "
    "operator private protected public register reinterpret_cast return short signed sizeof "
    "static static_assert static_cast struct switch template this thread_local throw true try "
    "typedef typeid typename union unsigned using virtual void volatile wchar_t while "
    "threadIdx blockIdx blockDim gridDim warpSize __global__ __device__ __shared__ main".split())
RESERVED = SPEC_KEYWORDS | CXX_KEYWORDS | frozenset(keyword.kwlist) | frozenset(keyword.softkwlist)

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
_PATTERN = re.compile(r"[A-Za-z0-9_.\-/:{}]+\Z")
_GLOB = re.compile(r"[A-Za-z0-9_.\-/:*?]+\Z")


def check_name(name: str, pos: Pos, what: str) -> str:
    if not _IDENT.match(name):
        raise SpecError(f"invalid {what} name '{name}'", pos,
                        "names start with a letter and use letters, digits and _ (at most 64)")
    if "__" in name:
        raise SpecError(f"invalid {what} name '{name}': '__' is reserved for generated names", pos)
    if name in RESERVED:
        raise SpecError(f"'{name}' is a reserved word and cannot name a {what}", pos,
                        "pick another name (keywords of the spec language, Python, C++ and CUDA are reserved)")
    return name


def check_pattern(text: str, pos: Pos, glob: bool = False) -> str:
    if not (_GLOB if glob else _PATTERN).match(text):
        allowed = "letters, digits, _ . - / : * ?" if glob else "letters, digits, _ . - / : and {index}"
        raise SpecError(f"invalid tensor name {text!r}", pos, f"tensor names use {allowed}")
    return text
