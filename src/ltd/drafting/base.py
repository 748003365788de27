"""The drafter interface.

A drafter proposes the top-k next tokens of tree nodes. It is told about committed
tokens through :meth:`Drafter.sync`, then drafts one tree per cycle: :meth:`root` for
the children of the pending token, :meth:`expand` for deeper frontiers, :meth:`end` to
drop its speculative state. Candidate ids are always *target* vocabulary ids.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ltd.tree import Tree


class Drafter(Protocol):
    """Proposes candidate continuations for the draft tree."""

    #: target feature layers this drafter needs from the target backend (None: none)
    feature_layers: Sequence[int] | None

    def reset(self) -> None:
        """Start a new sequence."""

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        """Learn about newly committed tokens.

        ``tokens`` is the whole committed sequence, pending token last. ``features`` are
        the target's features for the tokens the target processed since the last sync,
        in order (None when the drafter needs none).
        """

    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k children of the root (the pending token): (token ids [k], log-probs [k])."""

    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k children of each node in ``nodes``: (token ids [m, k], log-probs [m, k]).

        Every node's ancestors (other than the root) were expanded in earlier calls.
        """

    def end(self) -> None:
        """Drop speculative state after a tree is drafted."""


class NullDrafter:
    """Drafts nothing: the cycle degenerates to plain autoregressive decoding."""

    feature_layers = None

    def reset(self) -> None:
        pass

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        pass

    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("NullDrafter cannot draft; use depth 0")

    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("NullDrafter cannot draft; use depth 0")

    def end(self) -> None:
        pass


class ReversedDrafter:
    """Wraps a drafter and lists each node's candidates worst first.

    A stress test for backends that place the first-child chain specially (llama.cpp's
    exact cell layout): with the order reversed, the accepted path rarely is that chain.
    Used by tests and ``experiments/llamacpp_exactness.py``; never a good drafter.
    """

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.feature_layers = getattr(inner, "feature_layers", None)

    def reset(self) -> None:
        self.inner.reset()

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self.inner.sync(tokens, features)

    def end(self) -> None:
        self.inner.end()

    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logp = self.inner.root(tree, k)
        return tokens.flip(-1), logp.flip(-1)

    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logp = self.inner.expand(tree, nodes, k)
        return tokens.flip(-1), logp.flip(-1)
