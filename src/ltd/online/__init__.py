"""Online drafter adaptation from verification feedback."""

from ltd.online.learner import VARIANTS, OnlineConfig, OnlineLearner, reset_state

__all__ = ["VARIANTS", "OnlineConfig", "OnlineLearner", "reset_state"]
