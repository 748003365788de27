"""Online drafter adaptation from verification feedback: ``--online knn``.

:mod:`ltd.online.memory` (a memory of served sequences for n-gram analyses) is not
imported here: no default path uses it.
"""

from ltd.online.adapter import VARIANTS, OnlineAdapter, has_state, reset_state
from ltd.online.knn import KnnConfig, KnnMemory
from ltd.online.knn_drafter import KnnDrafter

__all__ = ["VARIANTS", "KnnConfig", "KnnDrafter", "KnnMemory", "OnlineAdapter", "has_state", "reset_state"]
