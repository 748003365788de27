"""Hybrid drafter: n-gram and model candidates merged into one scored tree.

Both drafters propose the top-k children of each node; the hybrid keeps the k best of
their union, a token proposed by both scored by the better of its two log-probabilities.
Where the text repeats itself the n-gram's confident continuations win, elsewhere the
model's, and the shared tree selection and size policy choose among both without
knowing where a node came from.

Either drafter can expand a node the other proposed: the n-gram drafter looks nodes up
by their tokens, a model drafter scores whatever tokens the tree holds.

``model_depth`` (spec suffix ``@D``, e.g. ``hybrid:ngram+builtin:NAME@1``) lets the model
draft only the first D levels; deeper levels come from the n-grams alone. Why: a model
draft step costs a forward (~6-7 ms for SmolLM2's head) while an n-gram step costs a trie
lookup, and where the text repeats itself the n-gram chain runs several tokens deep. With
the model limited to the root, a deep tree costs one model step, and the selection still
ranks the n-gram continuations against the model's first-level alternatives.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ltd.drafting.base import Drafter, fork_drafter
from ltd.errors import LtdError
from ltd.tree import Tree


def merge_candidates(
    tok_a: torch.Tensor, logp_a: torch.Tensor, tok_b: torch.Tensor, logp_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise union of two [m, k] candidate sets: the k best by max log-probability.

    Rows with fewer than k distinct finite candidates are padded with -inf (never verified).
    """
    toks = torch.cat([tok_a, tok_b], dim=-1)
    logps = torch.cat([logp_a, logp_b], dim=-1).float()
    out_t = torch.zeros((toks.shape[0], k), dtype=torch.long)
    out_l = torch.full((toks.shape[0], k), float("-inf"))
    for r in range(toks.shape[0]):
        best: dict[int, float] = {}
        for t, lp in zip(toks[r].tolist(), logps[r].tolist()):
            if lp == float("-inf"):
                continue
            if lp > best.get(t, float("-inf")):
                best[t] = lp
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:k]
        for j, (t, lp) in enumerate(ranked):
            out_t[r, j] = t
            out_l[r, j] = lp
    return out_t, out_l


class HybridDrafter:
    """An n-gram drafter and a model drafter drafting one tree together."""

    def __init__(self, ngram: Drafter, model: Drafter, model_depth: int | None = None) -> None:
        if model_depth is not None and model_depth < 1:
            raise LtdError(f"a hybrid's model depth must be >= 1, got {model_depth}")
        self.ngram = ngram
        self.model = model
        self.model_depth = model_depth  # None: the model drafts every level
        self.feature_layers = model.feature_layers

    def fork(self) -> "HybridDrafter":
        """Both halves forked (see :func:`ltd.drafting.base.fork_drafter`)."""
        return HybridDrafter(fork_drafter(self.ngram), fork_drafter(self.model), self.model_depth)

    def reset(self) -> None:
        self.ngram.reset()
        self.model.reset()

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self.ngram.sync(tokens, None)
        self.model.sync(tokens, features)

    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ta, la = self.ngram.root(tree, k)
        tb, lb = self.model.root(tree, k)
        t, lp = merge_candidates(ta.view(1, -1), la.view(1, -1), tb.view(1, -1), lb.view(1, -1), k)
        return t[0], lp[0]

    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ta, la = self.ngram.expand(tree, nodes, k)
        # nodes at depth d get children at depth d + 1: the model drafts levels 1..model_depth
        if self.model_depth is not None and nodes.numel() and int(tree.depths[nodes].min()) >= self.model_depth:
            # the model's retrieval memory (--online knn) still drafts here, at no model cost
            retrieved = getattr(self.model, "retrieved", None)
            found = retrieved(tree, nodes, k) if retrieved is not None else None
            return merge_candidates(ta, la, *found, k) if found is not None else (ta, la.float())
        tb, lb = self.model.expand(tree, nodes, k)
        return merge_candidates(ta, la, tb, lb, k)

    def end(self) -> None:
        self.ngram.end()
        self.model.end()


def hybrid_part(drafter, half: str, kind: type, error: str):
    """``drafter`` itself, or its ``half`` ("ngram" or "model") when it is a hybrid, if that
    is a ``kind``; otherwise a one-line error. Online adaptation uses it to find what it adapts."""
    if isinstance(drafter, HybridDrafter):
        drafter = getattr(drafter, half)
    if not isinstance(drafter, kind):
        raise LtdError(error)
    return drafter


def split_model_depth(model_spec: str) -> tuple[str, int | None]:
    """``SPEC@D`` -> (SPEC, D); a spec without a numeric ``@D`` suffix -> (SPEC, None),
    so a head directory whose path holds an ``@`` still loads."""
    base, at, depth = model_spec.rpartition("@")
    if not at or not depth.isdigit():
        return model_spec, None
    d = int(depth)
    if d < 1 or not base:
        raise LtdError(f"bad hybrid model depth in {model_spec!r}: write DRAFTER@D with D >= 1, e.g. builtin:smollm2-135m-eagle3@1")
    return base, d


MODEL_FREE_KINDS = ("ngram", "suffix")  # drafters that can be a hybrid's first half


def split_hybrid_spec(spec: str) -> tuple[str, str]:
    """``hybrid:ngram[:N]+MODEL_SPEC[@D]`` (or ``hybrid:suffix[:D]+...``) -> (model-free
    drafter spec, model drafter spec incl. ``@D``)."""
    body = spec[len("hybrid:"):]
    ngram, plus, model = body.partition("+")
    if not plus or ngram.partition(":")[0] not in MODEL_FREE_KINDS or not model:
        raise LtdError(f"bad drafter {spec!r}: write hybrid:ngram[:N]+DRAFTER or hybrid:suffix[:D]+DRAFTER, "
                       "e.g. hybrid:suffix+builtin:smollm2-135m-eagle3@1")
    return ngram, model
