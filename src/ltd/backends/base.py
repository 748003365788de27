"""The backend seam.

A backend holds one model and its KV cache over a *committed* context, plus any number
of *speculative* entries appended after it. Everything above this interface (trees,
selection, acceptance, controllers, RL, bench, server) sees only these few methods, so a
transformers model and a llama.cpp model are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ltd.errors import LtdError


@dataclass
class TreeOutput:
    """What one scoring pass returns.

    Attributes:
        logits: next-token logits at each scored node, float32, shape [n, vocab].
        features: hidden features at each node (concatenated feature layers), shape
            [n, F], or None when not requested or not available from the backend.
        exact: bool per node, shape [n]: True where the logits are bit-identical to
            plain one-token decoding of the node's path. None (the default) when the
            backend makes no such promise per node (its tree logits agree with plain
            decoding to rounding everywhere). Greedy acceptance stops before the first
            node that is not exact, so greedy output equals plain decoding token for token.
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None
    exact: torch.Tensor | None = None


def as_int_list(x: Sequence[int] | torch.Tensor) -> list[int]:
    """Token ids, parents or indices as a flat list of Python ints."""
    return x.reshape(-1).tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]


class SpeculativeCounters:
    """Bookkeeping and input checks shared by backends that keep ``_committed`` (tokens in
    the committed cache), ``_spec_parents`` and ``_spec_depths`` (one entry per
    speculative node), as both of ours do: one copy of the rules every backend enforces."""

    _committed: int
    _spec_parents: list[int]
    _spec_depths: list[int]
    vocab_size: int
    max_context: int

    @property
    def committed_length(self) -> int:
        return self._committed

    @property
    def speculative_length(self) -> int:
        return len(self._spec_parents)

    def _check_nodes(
        self, tokens: Sequence[int] | torch.Tensor, parents: Sequence[int] | torch.Tensor
    ) -> tuple[list[int], list[int], list[int]]:
        """Validate a score() call's nodes; returns (tokens, parents, depths) as lists.

        A parent must be -1 or an earlier speculative entry (this call's included), every
        token must be in the vocabulary, and the deepest node must fit the context. Depths
        count from the committed context (a node with parent -1 has depth 0).
        """
        toks, pars = as_int_list(tokens), as_int_list(parents)
        n = len(toks)
        if n == 0:
            raise ValueError("score() needs at least one node")
        if len(pars) != n:
            raise ValueError("tokens and parents differ in length")
        spec = self.speculative_length
        if any(p >= spec + i or p < -1 for i, p in enumerate(pars)):
            raise ValueError("a parent must be an earlier speculative entry or -1")
        if min(toks) < 0 or max(toks) >= self.vocab_size:
            raise ValueError("token id outside the model's vocabulary")
        depths: list[int] = []
        for p in pars:
            depths.append(0 if p < 0 else (self._spec_depths[p] if p < spec else depths[p - spec]) + 1)
        if self._committed + max(depths) + 1 > self.max_context:
            raise LtdError(
                f"context of {self._committed + max(depths) + 1} tokens exceeds the model's limit of "
                f"{self.max_context}; use a shorter prompt or fewer --max-new-tokens"
            )
        return toks, pars, depths

    def score_next(self, token: int) -> int:
        """Score ``token`` alone after the committed context and return its greedy next token.

        Exactly ``score([token], [-1])`` followed by the argmax of its logits: the entry
        stays speculative (commit or roll it back as usual). A cycle with nothing drafted
        needs only this, so backends may override it to skip building the logits tensor.
        """
        return int(torch.argmax(self.score([token], [-1]).logits[0]))

    def _check_path(self, keep: Sequence[int] | torch.Tensor) -> list[int]:
        """Validate a commit: ``keep`` must be speculative entries forming a root path, in order."""
        keep_l = as_int_list(keep)
        prev = -1
        for k in keep_l:
            if not 0 <= k < self.speculative_length:
                raise ValueError("commit index outside the speculative entries")
            if self._spec_parents[k] != prev:
                raise ValueError("committed entries must form a path from the context")
            prev = k
        return keep_l


class Backend(Protocol):
    """One model with a committed KV cache and speculative entries after it."""

    vocab_size: int
    max_context: int
    hidden_size: int
    num_layers: int

    @property
    def committed_length(self) -> int:
        """Tokens in the committed cache."""

    @property
    def speculative_length(self) -> int:
        """Speculative entries appended since the last commit or rollback."""

    def reset(self) -> None:
        """Forget everything (start a new sequence)."""

    def score(
        self,
        tokens: Sequence[int] | torch.Tensor,
        parents: Sequence[int] | torch.Tensor,
        feature_layers: Sequence[int] | None = None,
        last_only: bool = False,
    ) -> TreeOutput:
        """Append nodes as speculative entries and return their logits.

        ``parents[i]`` is the index of node i's parent among *all* speculative entries
        (earlier calls included, then this call's nodes) or -1 when the node follows the
        committed context directly. A node sees the committed context, its ancestors and
        itself, at position committed_length + depth. ``feature_layers`` asks for the
        hidden states entering those layers (index into the model's hidden-state list).
        ``last_only`` returns the last node's logits alone (shape [1, vocab]): a prefill
        or catch-up chain needs only those, and skipping the LM head on the other rows
        matters for large vocabularies (152k for Qwen) and long prompts.
        """

    def score_next(self, token: int) -> int:
        """``score([token], [-1])`` and the argmax of its logits, without handing the
        logits out: the one-token decode of a cycle with nothing drafted (greedy)."""

    def commit(self, keep: Sequence[int] | torch.Tensor) -> None:
        """Make the speculative entries ``keep`` (a root path, in order) committed; drop the rest."""

    def rollback(self) -> None:
        """Drop all speculative entries."""
