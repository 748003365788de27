"""EAGLE-3 draft heads, in four modules with one job each.

- :mod:`~ltd.drafting.eagle3.model` -- the head (one decoder layer over fused target features).
- :mod:`~ltd.drafting.eagle3.checkpoint` -- head directories: built-in heads, reading and writing.
- :mod:`~ltd.drafting.eagle3.drafter` -- drafting a tree with a head.
- :mod:`~ltd.drafting.eagle3.vocab` -- shrinking a head's draft vocabulary.

The kNN memory that can wrap the drafter is :mod:`ltd.online.knn_drafter`.
"""

from ltd.drafting.eagle3.checkpoint import (
    ASSETS,
    CONFIG_NAME,
    WEIGHTS_NAME,
    builtin_drafter_dir,
    check_head_matches_target,
    is_eagle3_dir,
    is_head_spec,
    load_head,
    resolve_head_dir,
    save_head,
)
from ltd.drafting.eagle3.drafter import WIDE_ROWS, Eagle3Drafter
from ltd.drafting.eagle3.model import Eagle3Config, Eagle3Head, init_random_head
from ltd.drafting.eagle3.vocab import shrink_draft_vocab

__all__ = [
    "ASSETS", "CONFIG_NAME", "WEIGHTS_NAME", "WIDE_ROWS", "Eagle3Config", "Eagle3Drafter", "Eagle3Head",
    "builtin_drafter_dir", "check_head_matches_target", "init_random_head", "is_eagle3_dir", "is_head_spec",
    "load_head", "resolve_head_dir", "save_head", "shrink_draft_vocab",
]
