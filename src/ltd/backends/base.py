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


class SpeculativeCounters:
    """``committed_length`` and ``speculative_length`` for backends that keep ``_committed``
    (tokens in the committed cache) and ``_spec_parents`` (one entry per speculative node),
    as both of ours do."""

    _committed: int
    _spec_parents: list[int]

    @property
    def committed_length(self) -> int:
        return self._committed

    @property
    def speculative_length(self) -> int:
        return len(self._spec_parents)


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

    def commit(self, keep: Sequence[int] | torch.Tensor) -> None:
        """Make the speculative entries ``keep`` (a root path, in order) committed; drop the rest."""

    def rollback(self) -> None:
        """Drop all speculative entries."""
