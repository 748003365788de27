"""Online drafter adaptation from verification feedback."""

from ltd.online.adapter import VARIANTS, OnlineAdapter, parse_variant
from ltd.online.knn import KnnConfig, KnnMemory
from ltd.online.learner import GRADIENT_VARIANTS, OnlineConfig, OnlineLearner, reset_state
from ltd.online.memory import StreamMemory

__all__ = ["GRADIENT_VARIANTS", "VARIANTS", "KnnConfig", "KnnMemory", "OnlineAdapter", "OnlineConfig", "OnlineLearner", "StreamMemory", "parse_variant", "reset_state"]
