"""Independent small-LM drafter (e.g. qwen2.5-coder-0.5b drafting for the 1.5b).

It runs through a :class:`~ltd.backends.base.Backend`, so the same drafter works on any
backend; the draft tree is scored with the backend's tree attention.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ltd.backends.base import Backend
from ltd.backends.hf import HFBackend
from ltd.errors import LtdError
from ltd.tree import Tree


class LMDrafter:
    """A causal LM sharing the target's tokenizer, drafting with its own KV cache."""

    feature_layers = None

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._tokens: list[int] = []
        self._node_entry: dict[int, int] = {}

    def fork(self) -> "LMDrafter":
        """The same draft model with its own cache, for another sequence decoded at the same
        time; only a transformers model can (a llama.cpp context holds one cache)."""
        if not isinstance(self.backend, HFBackend):
            raise LtdError(f"a draft model on {type(self.backend).__name__} cannot decode several requests at once; use --max-batch 1")
        return LMDrafter(HFBackend(self.backend.model, kernels=self.backend.kernel_plan or "stock"))

    def reset(self) -> None:
        self.backend.reset()
        self._tokens = []
        self._node_entry = {}

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self._tokens = list(tokens)

    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        done = self.backend.committed_length
        if done >= len(self._tokens):
            # Nothing new since the last draft (cannot happen in the cycle: the pending
            # token is always new). Re-score the last token to get its distribution.
            self.backend.rollback()
            self._truncate(done - 1)
            done -= 1
        new = self._tokens[done:]
        out = self.backend.score(new, list(range(-1, len(new) - 1)), last_only=True)
        self.backend.commit(list(range(len(new))))
        self._node_entry = {}
        logp = torch.log_softmax(out.logits[-1], dim=-1)
        val, idx = torch.topk(logp, k)
        return idx, val

    def _truncate(self, length: int) -> None:
        # Rare path: rebuild the cache from scratch up to ``length``.
        self.backend.reset()
        if length > 0:
            prefix = self._tokens[:length]
            self.backend.score(prefix, list(range(-1, length - 1)), last_only=True)
            self.backend.commit(list(range(length)))

    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.backend.speculative_length
        node_list = nodes.tolist()
        parents = []
        for j, node in enumerate(node_list):
            p = int(tree.parents[node])
            parents.append(-1 if p == 0 else self._node_entry[p])
            self._node_entry[node] = base + j
        out = self.backend.score(tree.tokens[nodes], parents)
        logp = torch.log_softmax(out.logits, dim=-1)
        val, idx = torch.topk(logp, k, dim=-1)
        return idx, val

    def end(self) -> None:
        self.backend.rollback()
        self._node_entry = {}
