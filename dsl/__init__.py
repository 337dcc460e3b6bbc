"""The spec language: grammar, parser, IR and checker."""

from .checker import check
from .errors import SpecError
from .loader import load_spec, parse_spec
from .plan import Plan

__all__ = ["Plan", "SpecError", "check", "load_spec", "parse_spec"]
