"""``--online knn``: an EAGLE-3 drafter wrapped with a kNN memory of its own states.

The wrapper drafts what the head drafts, and mixes in the continuations the target took
after the stored states nearest to the head's own (:class:`ltd.online.knn.KnnMemory`).
It wraps the drafter, as the hybrid drafter wraps its halves, rather than being assigned
into it: the head drafter knows nothing of the memory, and a frozen method keeps using
the unwrapped drafter. Drafts never change the output, so neither can the memory.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.hybrid import merge_candidates
from ltd.drafting.ngram import candidate_tensors, grade_trie, trie_node_of
from ltd.online.knn import KnnMemory, Retrieval
from ltd.tree import Tree


class KnnDrafter:
    """An :class:`Eagle3Drafter` whose drafts are voted on by a :class:`KnnMemory`."""

    def __init__(self, inner: Eagle3Drafter, memory: KnnMemory) -> None:
        self.inner = inner
        self.knn = memory
        self.head = inner.head
        self.feature_layers = inner.feature_layers
        self._clear()

    def _clear(self) -> None:
        self._retrieval: Retrieval | None = None  # the memory's retrieval at the last root
        self._retrieved_at = 0  # sequence length at that root
        self._trie_memo: dict[int, object] = {}
        self._node_tries: list[tuple[list[int], object]] = []  # (tokens down to a node, its own retrieval trie)

    def reset(self) -> None:
        self.knn.end_sequence()
        self.inner.reset()
        self._clear()

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self.inner.sync(tokens, features)

    @torch.inference_mode()
    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Learn from the new entries, then draft the first level from head and neighbours' votes."""
        out, t0 = self.inner.consume()
        knn, tokens = self.knn, self.inner.tokens
        committed = tokens[self._retrieved_at :] if self._retrieved_at else []
        if committed:  # what the target committed since the last root grades its votes and trie
            knn.grade(committed[0], self.inner.vocab_maps()[1])
            if self._retrieval is not None:
                knn.calibrate(self._retrieval.trie, committed)
            for path, trie in self._node_tries:  # the tries asked below drafted nodes the target took
                if committed[: len(path)] == path:
                    grade_trie(trie, committed[len(path) :], knn.reliability)
        self._node_tries = []
        normed = self.head.norm(out)
        keys = knn.keys_of(normed)
        knn.observe(t0, keys, tokens)  # every entry's state is a key; its label comes two tokens on
        self._retrieval = knn.retrieve(keys[-1], tokens[-1]) if len(knn) else None
        self._retrieved_at = len(tokens)
        self._trie_memo = {0: self._retrieval.trie if self._retrieval is not None else None}
        logp = torch.log_softmax(self.head.lm_head(normed[-1]).float(), dim=-1).cpu()
        return knn.mix(logp, *self.inner.vocab_maps(), self._retrieval, k)

    @torch.inference_mode()
    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        toks, logps = self.inner.expand(tree, nodes, k)
        found = self.retrieved(tree, nodes, k) if self._retrieval is not None else None
        if found is not None:
            return merge_candidates(toks, logps, *found, k)
        return toks, logps

    def retrieved(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Children of ``nodes`` from the retrieval tries (no model work beyond node votes).

        A hybrid asks this below the levels its model drafts (``@D``).
        """
        self._ask_at_nodes(tree, nodes)
        return candidate_tensors([self.knn.children(trie_node_of(tree, int(node), self._trie_memo), k) for node in nodes.tolist()], k)

    @torch.inference_mode()
    def _ask_at_nodes(self, tree: Tree, nodes: torch.Tensor) -> None:
        """Where the root's neighbours say nothing below a node, the node's own head state asks the store.

        Why: below a first-level token the root's neighbours did not vote for (the head's
        or the n-gram's), the retrieval trie is empty and, with the head limited to the root
        (``@1``), nothing drafts the second level unless the n-gram has a match. One head
        layer over the best few such nodes (no output layer) gives their states, and their
        own neighbours' continuations fill the gap, scored by the same q(depth).
        """
        budget = self.knn.cfg.node_votes
        if budget <= 0:
            return
        hidden = self.inner.node_hidden
        lacking = [
            n for n in nodes.tolist()
            if int(tree.parents[n]) in hidden and not getattr(trie_node_of(tree, n, self._trie_memo), "children", None)
        ]
        lacking = sorted(lacking, key=lambda n: -float(tree.scores[n]))[:budget]
        if not lacking:
            return
        fresh = [n for n in lacking if n not in hidden]  # a full-depth head already ran the others
        if fresh:
            self.inner.advance(tree, torch.tensor(fresh))
        keys = self.knn.keys_of(self.head.norm(torch.stack([hidden[n] for n in lacking])))
        for j, n in enumerate(lacking):
            found = self.knn.retrieve(keys[j], int(tree.tokens[n]), depth=int(tree.depths[n]))
            if found is not None:
                self._trie_memo[n] = found.trie
                self._node_tries.append(([int(tree.tokens[i]) for i in tree.path_to(n)[1:]], found.trie))

    def end(self) -> None:
        self.inner.end()
