"""N-gram drafter: a tree of continuations found in the prompt and the text so far.

Code, summaries and multi-turn chat repeat spans of their context. At each cycle the
drafter looks for earlier occurrences of the longest suffix of the sequence (n tokens,
n from ``max_n`` down to 1), takes the ``max_len`` tokens that followed *every*
occurrence and merges them into a trie.

A trie child's probability is ``q(n + d) * count(child) / count(parent)``: its share of
the matches through its parent, times how often a continuation is right after a match of
that length. ``d`` is the parent's depth in the trie, because a node d tokens deep
continues a match of n + d tokens. ``q`` (:data:`DEFAULT_RELIABILITY`) was measured on
the target's own text, never on the benchmark suites: a 4-token match is followed by
the same token about 90% of the time, a 1-token match about a third of the time. The
scores are calibrated probabilities, so a hybrid tree ranks n-gram and model candidates
on one scale, and the tree selection verifies a long match as deep as it deserves.

It needs no model and no target features, so it works on every backend. Where the trie
has fewer than k children, the remaining candidates are padding with score ``-inf``
which :func:`ltd.tree.select` never verifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ltd.drafting.base import TreeDraft, beam_flatten
from ltd.errors import LtdError
from ltd.tree import Tree

DEFAULT_MAX_N = 3
DEFAULT_MAX_LEN = 16
DEFAULT_MAX_MATCHES = 64  # most recent occurrences kept: bounds the trie's cost per cycle
# q(m) for an effective match length m = 1, 2, ... (the last entry for longer ones): the
# share of top continuations the target confirmed after a match of m tokens, on 528
# ShareGPT prompts answered by SmolLM2-135M itself (experiments/ngram_calibration.py,
# benchmarks/ngram-calibration). Another target's text may differ: rerun the script on its
# regenerated answers and pass the table as ``reliabilities``.
DEFAULT_RELIABILITY = (0.37, 0.52, 0.63, 0.90, 0.93, 0.95, 0.96, 0.97)
PAD_TOKEN = 0
SEP = -1  # never a token id: ends a continuation (the stream memory puts it between sequences)


@dataclass
class TrieNode:
    """Continuations that pass through one token; ``count`` occurrences reach it."""

    count: int = 0
    depth: int = 0  # tokens between the matched suffix and this node
    children: dict[int, "TrieNode"] = field(default_factory=dict)

    def ranked(self) -> list[tuple[int, "TrieNode"]]:
        """Children by count (most frequent first); insertion order breaks ties (most recent first)."""
        return sorted(self.children.items(), key=lambda kv: -kv[1].count)


def find_matches(tokens: Sequence[int] | np.ndarray, max_n: int, max_matches: int = DEFAULT_MAX_MATCHES) -> tuple[int, list[int]]:
    """End positions of earlier occurrences of the longest matching suffix.

    Returns (n, ends): ``n`` is the suffix length that matched (0 when none did) and
    ``ends`` the indices j < len-1 with ``tokens[j-n+1 : j+1] == tokens[-n:]``, most
    recent first, at most ``max_matches``.
    """
    arr = np.asarray(tokens, dtype=np.int64)
    length = int(arr.size)
    if length < 2:
        return 0, []
    # candidates: earlier positions holding the last token (the last position itself excluded)
    ends = np.nonzero(arr[:-1] == arr[-1])[0]
    if ends.size == 0:
        return 0, []
    best_n, best = 1, ends
    for offset in range(1, min(max_n, length - 1)):
        ends = ends[ends - offset >= 0]
        ends = ends[arr[ends - offset] == arr[length - 1 - offset]]
        if ends.size == 0:
            break
        best_n, best = offset + 1, ends
    return best_n, [int(j) for j in best[::-1][:max_matches]]


def build_trie(tokens: Sequence[int] | np.ndarray, ends: Sequence[int], max_len: int) -> TrieNode:
    """Merge the continuations after each end position (up to ``max_len`` tokens) into a trie."""
    arr = np.asarray(tokens, dtype=np.int64)
    root = TrieNode()
    for j in ends:
        cont = arr[j + 1 : j + 1 + max_len].tolist()
        if SEP in cont:  # a remembered sequence ends there
            cont = cont[: cont.index(SEP)]
        if not cont:
            continue
        root.count += 1
        node = root
        for tok in cont:
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = TrieNode(depth=node.depth + 1)
            child.count += 1
            node = child
    return root


def table_index(match_length: int, size: int) -> int:
    """Entry of a q(m) table for an m-token match: m - 1, the last entry beyond the table."""
    return min(max(match_length, 1), size) - 1


def reliability(reliabilities: Sequence[float], match_length: int) -> float:
    """q(m): how often a continuation after an m-token match is right (the last entry beyond)."""
    return float(reliabilities[table_index(match_length, len(reliabilities))])


def grade_trie(node: TrieNode | None, committed: Sequence[int], calibration, offset: int = 0) -> None:
    """Walk a trie along the tokens the target committed while its top child was right.

    Each step is one trial of q(offset + depth) for ``calibration.observe`` (an
    :class:`ltd.online.reliability.OnlineReliability`), given the top child's count share.
    """
    for tok in committed:
        if node is None or not node.count or not node.children:
            return
        top, child = node.ranked()[0]
        calibration.observe(offset + node.depth, child.count / node.count, top == tok)
        if top != tok:
            return
        node = child


def top_children(
    node: TrieNode | None, k: int, match_length: int = 1, reliabilities: Sequence[float] = DEFAULT_RELIABILITY
) -> tuple[list[int], list[float]]:
    """The k best children of a trie node as (tokens, log-probs), padded to k with (PAD_TOKEN, -inf).

    ``match_length`` is the suffix length that matched to build the trie; a child's
    probability is ``q(match_length + depth) * count(child) / count(node)``.
    """
    toks: list[int] = []
    logps: list[float] = []
    if node is not None and node.count:
        q = reliability(reliabilities, match_length + node.depth)
        for tok, child in node.ranked()[:k]:
            toks.append(tok)
            logps.append(math.log(q * child.count / node.count))
    pad = k - len(toks)
    return toks + [PAD_TOKEN] * pad, logps + [-math.inf] * pad


def trie_node_of(tree: Tree, node: int, memo: dict[int, TrieNode | None]) -> TrieNode | None:
    """The trie node reached by a tree node's path of tokens; ``memo`` maps tree nodes to
    trie nodes and starts as ``{0: trie root}``. None where the trie lacks the path."""
    if node in memo:
        return memo[node]
    parent = trie_node_of(tree, int(tree.parents[node]), memo)
    found = parent.children.get(int(tree.tokens[node])) if parent is not None else None
    memo[node] = found
    return found


def candidate_tensors(rows: Sequence[tuple[list[int], list[float]]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (k tokens, k log-probs), as :func:`top_children` gives them, as [m, k] tensors."""
    toks = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), k)
    logps = torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(len(rows), k)
    return toks, logps


class NgramDrafter:
    """Drafts a scored tree of continuations seen earlier in the sequence."""

    feature_layers = None

    def __init__(
        self,
        max_n: int = DEFAULT_MAX_N,
        max_len: int = DEFAULT_MAX_LEN,
        max_matches: int = DEFAULT_MAX_MATCHES,
        reliabilities: Sequence[float] = DEFAULT_RELIABILITY,
    ) -> None:
        if max_n < 1:
            raise LtdError(f"ngram:N needs N >= 1, got {max_n}")
        if not reliabilities or not all(0.0 < q <= 1.0 for q in reliabilities):
            raise LtdError(f"n-gram reliabilities must be probabilities in (0, 1], got {list(reliabilities)}")
        self.max_n = max_n
        self.max_len = max_len
        self.max_matches = max_matches
        self.reliabilities = tuple(float(q) for q in reliabilities)
        self._tokens: list[int] = []
        self.reset()

    def fork(self) -> "NgramDrafter":
        """The same drafter for another sequence (batching): it keeps no memory across sequences."""
        return NgramDrafter(self.max_n, self.max_len, self.max_matches, self.reliabilities)

    def reset(self) -> None:
        self._tokens = []
        self._trie: TrieNode | None = None
        self._memo: dict[int, TrieNode | None] = {}
        self.last_match_length = 0

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self._tokens = list(tokens)

    def _build(self) -> None:
        """This cycle's trie (None without a match)."""
        arr = np.asarray(self._tokens, dtype=np.int64)
        n, ends = find_matches(arr, self.max_n, self.max_matches)
        self.last_match_length = n
        self._trie = build_trie(arr, ends, self.max_len) if ends else None
        self._memo = {0: self._trie}

    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._build()
        n = self.last_match_length
        toks, logps = top_children(self._trie, k, n, self.reliabilities)
        return torch.tensor(toks, dtype=torch.long), torch.tensor(logps, dtype=torch.float32)

    def draft_tree(self, k: int, max_depth: int) -> TreeDraft:
        """The whole trie at once (see :class:`ltd.drafting.base.WholeTreeDrafter`)."""
        self._build()
        n, q = self.last_match_length, self.reliabilities

        def children(node: TrieNode, k: int) -> list[tuple[int, float, TrieNode]]:
            if not node.count:
                return []
            qd = reliability(q, n + node.depth)  # as top_children scores them
            return [(tok, math.log(qd * child.count / node.count), child) for tok, child in node.ranked()[:k]]

        return beam_flatten(self._trie, children, k, max_depth)

    def trie_node(self, tree: Tree, node: int) -> TrieNode | None:
        """The trie node of a tree node, found by its tokens (None when the trie lacks the path).

        Looking nodes up by their path, not by where they sit in the tree, keeps this
        correct for trees built from several drafters' candidates.
        """
        return trie_node_of(tree, node, self._memo)

    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, q = self.last_match_length, self.reliabilities
        return candidate_tensors([top_children(self.trie_node(tree, int(node)), k, n, q) for node in nodes.tolist()], k)

    def end(self) -> None:
        self._trie = None
        self._memo = {}


def parse_ngram_spec(spec: str) -> NgramDrafter:
    """``ngram`` or ``ngram:N`` (longest suffix n-gram tried, default 3)."""
    _, _, arg = spec.partition(":")
    if not arg:
        return NgramDrafter()
    try:
        n = int(arg)
    except ValueError:
        raise LtdError(f"bad drafter {spec!r}: write ngram or ngram:N with N a positive integer, e.g. ngram:3") from None
    return NgramDrafter(max_n=n)
