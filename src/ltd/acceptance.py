"""Acceptance: which drafted path the target agrees with, plus its bonus token.

Greedy: follow the child whose token equals the target's argmax.

Sampling: at each node draw x from the target's (temperature, top-p) distribution and
follow the child whose token is x; stop when no child matches, x is the bonus token.
Draft children are deterministic top-k candidates, i.e. point-mass proposals, for which
recursive rejection sampling (SpecInfer / EAGLE tree sampling) reduces exactly to this
rule: accepting candidate c with probability p(c) and otherwise resampling from the
residual equals drawing x ~ p and checking whether x is a candidate. Every emitted token
is therefore a draw from the target's distribution given its prefix: lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltd.tree import Tree


@dataclass
class SamplingConfig:
    """temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Accepted:
    """The accepted root path (node indices, root first) and the target's next token."""

    path: list[int]
    bonus: int

    @property
    def num_accepted(self) -> int:
        """Drafted tokens accepted (root excluded)."""
        return len(self.path) - 1


def target_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution the target samples from: softmax(logits / T) restricted to top-p."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, dim=-1)
        cum = torch.cumsum(sorted_p, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (cum - sorted_p) >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def accept(
    tree: Tree,
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Accepted:
    """Walk the tree from the root using the target's logits at each node ([n, vocab])."""
    kids = tree.children()
    tokens = tree.tokens.tolist()
    path = [0]
    node = 0
    while True:
        if sampling.greedy:
            nxt = int(torch.argmax(logits[node]))
        else:
            probs = target_probs(logits[node], sampling)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        match = next((c for c in kids[node] if tokens[c] == nxt), None)
        if match is None:
            return Accepted(path=path, bonus=nxt)
        path.append(match)
        node = match
