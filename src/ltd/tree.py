"""Draft trees: the data structure every stage of the cycle passes along.

Node 0 is the root: the pending token that the target has already chosen (the bonus
token of the previous cycle) but not yet processed. Every other node is a drafted
candidate. Parents always come before their children, so index order is a topological
order; that keeps masks, positions and acceptance simple loops over indices.

Everything here works on plain tensors and never runs a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Tree:
    """A draft tree.

    Attributes:
        tokens: token id of each node, shape [n].
        parents: parent index of each node, -1 for the root, shape [n].
        depths: depth of each node (root 0), shape [n].
        scores: cumulative draft log-probability of the path to each node (root 0), shape [n].
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor

    @staticmethod
    def root(token: int) -> "Tree":
        """A tree with only the root (the pending token).

        Built with ``full``/``zeros`` rather than from Python lists, which cost twice as
        much: every cycle opens one, including those that draft nothing."""
        return Tree(
            tokens=torch.full((1,), int(token), dtype=torch.long),
            parents=torch.full((1,), -1, dtype=torch.long),
            depths=torch.zeros(1, dtype=torch.long),
            scores=torch.zeros(1, dtype=torch.float32),
        )

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_drafted(self) -> int:
        """Number of drafted nodes (all but the root)."""
        return len(self) - 1

    @property
    def max_depth(self) -> int:
        return int(self.depths.max().item()) if len(self) else 0

    def add(self, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Append nodes (parents must already exist); returns their indices."""
        tokens = tokens.reshape(-1).to(torch.long)
        parents = parents.reshape(-1).to(torch.long)
        scores = scores.reshape(-1).to(torch.float32)
        start = len(self)
        if parents.numel() and int(parents.max()) >= start:
            raise ValueError("a parent must be added before its children")
        self.tokens = torch.cat([self.tokens, tokens])
        self.parents = torch.cat([self.parents, parents])
        self.depths = torch.cat([self.depths, self.depths[parents] + 1])
        self.scores = torch.cat([self.scores, scores])
        return torch.arange(start, start + tokens.numel())

    def add_subtree(self, tokens, parents, scores, depths) -> torch.Tensor:
        """Append a whole subtree below the root in one go; returns the new nodes' indices.

        A drafter that knows its whole tree after the root (a suffix or n-gram trie) hands
        it over at once instead of one level per call, which saves the per-level
        concatenations. ``parents`` index the new nodes themselves (-1: the root) and must
        come before their children; ``depths`` are the new nodes' depths (1 below the
        root). Arrays or sequences (numpy, lists, tensors) of equal length.
        """
        local = np.asarray(parents, dtype=np.int64).reshape(-1)
        deps = np.asarray(depths, dtype=np.int64).reshape(-1)
        toks = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        vals = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
        n = local.size
        if toks.size != n or vals.size != n or deps.size != n:
            raise ValueError("a subtree needs as many tokens, scores and depths as parents")
        if n and bool((local >= np.arange(n)).any()):
            raise ValueError("a parent must be added before its children")
        start = len(self)
        above = np.maximum(local, 0)
        if n and bool((deps != np.where(local >= 0, deps[above] + 1, 1)).any()):
            raise ValueError("subtree depths do not follow from its parents")
        absolute = np.where(local >= 0, above + start, 0)
        self.tokens = torch.cat([self.tokens, torch.from_numpy(toks)])
        self.parents = torch.cat([self.parents, torch.from_numpy(absolute)])
        self.depths = torch.cat([self.depths, torch.from_numpy(deps)])
        self.scores = torch.cat([self.scores, torch.from_numpy(vals)])
        return torch.arange(start, start + n)

    def path_to(self, node: int) -> list[int]:
        """Indices from the root to ``node`` inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = int(self.parents[node])
        return path[::-1]

    def children(self) -> list[list[int]]:
        """Children lists, in index order."""
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                kids[p].append(i)
        return kids


@dataclass
class Selection:
    """A subtree chosen for verification, with the map back to the full tree."""

    tree: Tree
    source_index: torch.Tensor  # for each node of ``tree``, its index in the full tree


def select(tree: Tree, size: int) -> Selection:
    """The root plus the ``size`` best drafted nodes, closed under parents.

    Nodes are ranked by cumulative score, ties broken by depth (shallower first) then by
    index. A child's cumulative score never exceeds its parent's (log-probabilities are
    <= 0), so with this tie-break every parent ranks before its children and the top-V
    set is closed under "parent of a selected node is selected".

    Nodes scored ``-inf`` are padding from a drafter that had fewer than k candidates
    (e.g. the n-gram drafter): they are never selected, so they cost no verification.
    """
    if size < 0:
        raise ValueError(f"verification size must be >= 0, got {size}")
    size = min(size, int(torch.isfinite(tree.scores[1:]).sum()))
    if size == 0:
        chosen = torch.zeros(1, dtype=torch.long)
    else:
        drafted = torch.arange(1, len(tree))
        # Stable sorts applied from the least to the most significant key.
        order = drafted
        order = order[torch.argsort(tree.depths[order], stable=True)]
        order = order[torch.argsort(-tree.scores[order], stable=True)]
        top = order[:size]
        # Guard against float ties that put a child above its parent (scores equal).
        top = _close_under_parents(tree, top, size)
        top = top[torch.argsort(top, stable=True)]  # index order keeps parents first
        chosen = torch.cat([torch.zeros(1, dtype=torch.long), top])
    remap = torch.full((len(tree),), -1, dtype=torch.long)
    remap[chosen] = torch.arange(chosen.numel())
    parents = tree.parents[chosen]
    new_parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
    sub = Tree(
        tokens=tree.tokens[chosen],
        parents=new_parents,
        depths=tree.depths[chosen],
        scores=tree.scores[chosen],
    )
    return Selection(tree=sub, source_index=chosen)


def _close_under_parents(tree: Tree, top: torch.Tensor, size: int) -> torch.Tensor:
    """Return ``top`` if closed under parents, else a closed set of the same size.

    The fallback walks the ranking and admits a node only after its parent, which keeps
    the set closed even when rounding made a child score equal to or above its parent.
    """
    chosen = set(top.tolist()) | {0}
    if all(int(tree.parents[i]) in chosen for i in top.tolist()):
        return top
    admitted: list[int] = []
    have = {0}
    pending = sorted(range(1, len(tree)), key=lambda i: (-float(tree.scores[i]), int(tree.depths[i]), i))
    while len(admitted) < size:
        for i in pending:
            if i not in have and int(tree.parents[i]) in have:
                have.add(i)
                admitted.append(i)
                break
    return torch.tensor(admitted, dtype=torch.long)


def ancestor_mask(parents: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Boolean [n, n] matrix: entry (i, j) is True when j is i or an ancestor of i.

    ``parents`` uses -1 for nodes attached to the committed context. Index order must be
    topological (parent < child); ``check=False`` skips that check for callers that
    validated already (it reads one value back from the device).

    Built with tensor ops on ``parents``' device by pointer doubling: after round r each
    row holds the node's ancestors up to distance 2^r - 1 and ``jump`` points 2^r up, so
    ceil(log2(n)) rounds of two gathers cover any depth, with no Python loop over nodes.
    """
    n = int(parents.numel())
    device = parents.device
    parents = parents.reshape(-1).to(torch.long)
    if check and n and bool((parents >= torch.arange(n, device=device)).any()):
        raise ValueError("parents must precede children")
    # Row n is a sentinel: no ancestors, and it jumps to itself.
    sentinel = torch.full((1,), n, dtype=torch.long, device=device)
    jump = torch.cat([torch.where(parents >= 0, parents, sentinel), sentinel])
    mask = torch.eye(n + 1, n, dtype=torch.bool, device=device)
    for _ in range(max(n - 1, 0).bit_length()):  # depths are at most n - 1 < 2^rounds
        mask = mask | mask[jump]
        jump = jump[jump]
    return mask[:n]


def depths_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """Depth of each node below the committed context (0 for nodes with parent -1)."""
    plist = parents.tolist()
    depths = [0] * len(plist)
    for i, p in enumerate(plist):
        depths[i] = 0 if p < 0 else depths[p] + 1
    return torch.tensor(depths, dtype=torch.long)
