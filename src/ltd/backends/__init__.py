"""Backends: the only code that runs a target or drafter language model."""

from ltd.backends.base import Backend, TreeOutput

__all__ = ["Backend", "TreeOutput"]
