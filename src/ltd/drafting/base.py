"""The drafter interface.

A drafter proposes the top-k next tokens of tree nodes. It is told about committed
tokens through :meth:`Drafter.sync`, then drafts one tree per cycle: :meth:`root` for
the children of the pending token, :meth:`expand` for deeper frontiers, :meth:`end` to
drop its speculative state. Candidate ids are always *target* vocabulary ids.

A model-free drafter knows its whole tree once it has the root (a trie of earlier
continuations), so asking it level by level only costs the cycle's bookkeeping. Such a
drafter may also offer :meth:`WholeTreeDrafter.draft_tree`: the cycle then takes the
whole tree in one step (:class:`ltd.cycle.DraftSession`). :func:`beam_flatten` gives that
tree the shape the per-level cycle would have drafted, so both paths verify the same nodes.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np
import torch

from ltd.errors import LtdError
from ltd.tree import Tree

Node = TypeVar("Node")


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

    def fork(self) -> "NullDrafter":
        return NullDrafter()

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


def fork_drafter(drafter: Drafter) -> Drafter:
    """A drafter for another sequence decoded at the same time as ``drafter``'s (batching):
    the same weights, configuration and shared memory, its own per-sequence state.

    Drafters say how through a ``fork()`` method; one without it (a drafter that learns
    online from one sequence, or a model drafter on llama.cpp) cannot be batched.
    """
    fork = getattr(drafter, "fork", None)
    if fork is None:
        raise LtdError(f"the {type(drafter).__name__} drafter cannot decode several requests at once; use --max-batch 1")
    return fork()


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


@dataclass
class TreeDraft:
    """A whole draft tree below the root, in topological order (parents first).

    ``parents`` index these nodes (-1: the root), ``depths`` start at 1 below the root and
    ``scores`` are cumulative log-probabilities, as :meth:`ltd.tree.Tree.add_subtree` takes them.
    """

    tokens: np.ndarray  # int64 [n]
    parents: np.ndarray  # int64 [n]
    depths: np.ndarray  # int64 [n]
    scores: np.ndarray  # float32 [n]

    def __len__(self) -> int:
        return int(self.tokens.size)

    @property
    def depth(self) -> int:
        return int(self.depths.max()) if self.depths.size else 0


class WholeTreeDrafter(Drafter, Protocol):
    """A drafter that can hand over its whole tree after the root (optional capability)."""

    def draft_tree(self, k: int, max_depth: int) -> TreeDraft:
        """Instead of :meth:`root` and the :meth:`expand` calls: every node at most
        ``max_depth`` deep, shaped as :func:`beam_flatten` shapes it. :meth:`end` still follows."""


def beam_flatten(
    root: Node | None,
    children: Callable[[Node, int], Sequence[tuple[int, float, Node]]],
    k: int,
    max_depth: int,
) -> TreeDraft:
    """The tree the per-level cycle drafts from a known trie, built in one pass.

    ``children(node, k)`` lists a node's best (at most k) children as (token, log-prob,
    child node), best first. Level 1 holds the root's children; each later level the
    children of the frontier, which is the k best nodes of the level above by cumulative
    score (ties: the earlier node first). That is :meth:`ltd.cycle.DraftSession.step`'s
    rule, so this tree holds exactly the per-level tree's scored nodes, in the same
    order; its padding (score -inf, never verified) is left out.
    """
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    scores: list[float] = []
    frontier = [(root, -1, 0.0)] if root is not None else []
    depth = 0
    while depth < max_depth and frontier:
        if len(frontier) == 1:  # a chain (one occurrence, or all agree): walk it in one go
            node, index, score = frontier[0]
            chain = _chain(node, children, k, max_depth - depth)
            if chain:
                logps = np.array([score] + [c[1] for c in chain], dtype=np.float32)
                cums = np.cumsum(logps, dtype=np.float32)[1:].tolist()  # float32, in order: as the cycle adds
                base = len(tokens)
                tokens.extend(c[0] for c in chain)
                parents.extend(range(base - 1, base + len(chain) - 1))
                parents[base] = index
                depths.extend(range(depth + 1, depth + len(chain) + 1))
                scores.extend(cums)
                depth += len(chain)
                frontier = [(chain[-1][2], len(tokens) - 1, cums[-1])]
                continue
        kids = [(child, index, score, token, logp) for node, index, score in frontier for token, logp, child in children(node, k)]
        if not kids:
            break
        depth += 1
        # float32 sums, as the per-level cycle adds float32 tensors: equal scores stay
        # equal ties whatever order their log-probs were added in
        logps = array("f", [kid[4] for kid in kids])
        cums = array("f", [kid[2] + logp for kid, logp in zip(kids, logps)]).tolist()
        base = len(tokens)
        tokens.extend(kid[3] for kid in kids)
        parents.extend(kid[1] for kid in kids)
        depths.extend([depth] * len(kids))
        scores.extend(cums)
        level = [(kid[0], base + i, cum) for i, (kid, cum) in enumerate(zip(kids, cums))]
        frontier = sorted(level, key=lambda c: -c[2])[:k] if len(level) > 1 else level
    return TreeDraft(
        np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64),
        np.array(depths, dtype=np.int64), np.array(scores, dtype=np.float32),
    )


def _chain(node, children, k: int, limit: int) -> list:
    """The run of only children below ``node`` (at most ``limit``), as (token, log-prob, node)."""
    chain = []
    while len(chain) < limit:
        kids = children(node, k)
        if len(kids) != 1:
            break
        chain.append(kids[0])
        node = kids[0][2]
    return chain
