"""Hybrid drafter: n-gram and model candidates merged into one scored tree.

Both drafters propose the top-k children of each node; the hybrid keeps the k best of
their union, a token proposed by both scored by the better of its two log-probabilities.
Where the text repeats itself the n-gram's confident continuations win, elsewhere the
model's, and the shared tree selection and size policy choose among both without
knowing where a node came from.

Either drafter can expand a node the other proposed: the n-gram drafter looks nodes up
by their tokens, a model drafter scores whatever tokens the tree holds.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ltd.drafting.base import Drafter
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

    def __init__(self, ngram: Drafter, model: Drafter) -> None:
        self.ngram = ngram
        self.model = model
        self.feature_layers = model.feature_layers

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
        tb, lb = self.model.expand(tree, nodes, k)
        return merge_candidates(ta, la, tb, lb, k)

    def end(self) -> None:
        self.ngram.end()
        self.model.end()


def split_hybrid_spec(spec: str) -> tuple[str, str]:
    """``hybrid:ngram[:N]+MODEL_SPEC`` -> (n-gram spec, model drafter spec)."""
    body = spec[len("hybrid:"):]
    ngram, plus, model = body.partition("+")
    if not plus or not (ngram == "ngram" or ngram.startswith("ngram:")) or not model:
        raise LtdError(f"bad drafter {spec!r}: write hybrid:ngram[:N]+DRAFTER, e.g. hybrid:ngram+builtin:smollm2-135m-eagle3")
    return ngram, model
