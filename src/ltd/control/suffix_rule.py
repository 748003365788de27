"""SuffixDecoding's own rule, as a baseline for the cost-aware and learned controllers.

SuffixDecoding (arXiv 2411.04975) drafts as deep as its suffix trie allows -- at most
``alpha * m`` tokens after an m-token match, nodes below probability 0.1 pruned, the
probabilities from counts -- and verifies every drafted node; with no match it decodes
plainly. The suffix drafter (:mod:`ltd.drafting.suffix`) already applies the depth cap
and the pruning when it builds the trie, so the rule here is only: draft while the trie
has nodes at the next level, then verify all of them.
"""

from __future__ import annotations

import torch

from ltd.control.base import MAX_DEPTH, ControllerBase, validate_static
from ltd.controller import DraftStepState
from ltd.defaults import DEFAULT_TOPK
from ltd.drafting.suffix import suffix_stats
from ltd.errors import LtdError


class SuffixRuleController(ControllerBase):
    """Draft the whole suffix trie (up to ``max_depth`` levels) and verify every node.

    It follows the live drafter's trie (:func:`ltd.drafting.suffix.suffix_stats`), so the
    engine binds the drafter before decoding (:meth:`bind_drafter`); drafters without a
    suffix trie are refused with the fix. A hybrid ``hybrid:suffix+...`` drafts as deep
    as its suffix half's trie, and every node of both halves is verified.
    """

    def __init__(self, topk: int = DEFAULT_TOPK, max_depth: int = MAX_DEPTH) -> None:
        validate_static(min(max_depth, MAX_DEPTH), topk, 1)
        self.topk = topk
        self.max_depth = max_depth
        self.drafter = None

    def bind_drafter(self, drafter) -> None:
        """Follow ``drafter``'s trie; one-line error when it has none."""
        if suffix_stats(drafter) is None:
            raise LtdError("method suffix-rule follows the suffix drafter's trie; use --drafter suffix or hybrid:suffix+...")
        self.drafter = drafter

    def continue_drafting(self, state: DraftStepState) -> bool:
        if state.step == 0:
            return True  # the root step finds the match and builds the trie
        if state.step >= self.max_depth:
            return False
        stats = suffix_stats(self.drafter) if self.drafter is not None else None
        if stats is not None and state.step >= stats.depth:
            return False  # below the trie (no match: depth 0)
        return bool(torch.isfinite(state.candidate_scores).any())

    def choose_size(self, state: DraftStepState) -> int:
        return int(torch.isfinite(state.tree.scores[1:]).sum())
