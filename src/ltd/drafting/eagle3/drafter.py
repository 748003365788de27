"""The EAGLE-3 drafter: drafts a tree with an :class:`~ltd.drafting.eagle3.model.Eagle3Head`
on the target backend's features, keeping the head's own KV cache in step with the
target's committed tokens.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ltd.drafting.eagle3.model import Eagle3Head
from ltd.tree import Tree, ancestor_mask

WIDE_ROWS = 16  # CPU catch-ups of at least this many positions run on a float32 twin


class Eagle3Drafter:
    """Drafts with an :class:`Eagle3Head` on features from the target backend."""

    def __init__(self, head: Eagle3Head, embed_tokens: nn.Embedding) -> None:
        self.head = head.eval()
        self.embed = embed_tokens
        self.feature_layers = list(head.config.eagle_aux_hidden_state_layer_ids)
        p = next(head.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._wide: Eagle3Head | None = None
        self._wide_key: tuple = ()
        self._vocab_maps: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset()

    def _wide_head(self) -> Eagle3Head | None:
        """A float32 twin of a half-precision head on the CPU, for wide catch-ups.

        Why: a half-precision head is the fast choice for the 1-3 positions a cycle adds
        (memory-bound), but this CPU has no native bf16 arithmetic, so the catch-up over
        a whole prompt is compute-bound and slow: 430 ms in bfloat16 against 111 ms in
        float32 for a 671-token prompt (SmolLM2 head, 1 thread). The twin is rebuilt
        whenever the serving weights change (online learning writes them in place).
        """
        if self.device.type != "cpu" or self.dtype == torch.float32:
            return None
        key = tuple((p.data_ptr(), p._version) for p in self.head.parameters())
        if self._wide is None or key != self._wide_key:
            with torch.inference_mode(False), torch.no_grad():
                self._wide = copy.deepcopy(self.head).float().eval()
            self._wide_key = key
        return self._wide

    def fork(self) -> "Eagle3Drafter":
        """The same head (shared weights, not copied) with its own cache, for another
        sequence decoded at the same time."""
        twin = Eagle3Drafter(self.head, self.embed)
        twin._wide, twin._wide_key = self._wide, self._wide_key  # the float32 twin too, if made
        return twin

    def reset(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._consumed = 0  # head entries committed (= target positions consumed)
        self._tokens: list[int] = []
        self._pending: list[torch.Tensor] = []  # target features not yet consumed
        self._spec_k: list[torch.Tensor] = []
        self._spec_v: list[torch.Tensor] = []
        self._spec_parent: list[int] = []  # parent spec entry (-1 = context)
        self._node_entry: dict[int, int] = {}
        self.node_hidden: dict[int, torch.Tensor] = {}  # head output state of each drafted node (0: the root)

    @property
    def tokens(self) -> list[int]:
        """The committed sequence as last synced."""
        return self._tokens

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self._tokens = list(tokens)
        if features is not None and features.numel():
            self._pending.append(features.to(self.device, self.dtype))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.to(self.embed.weight.device)).to(self.device, self.dtype)

    @torch.inference_mode()
    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logp = self._topk(self.consume()[0][-1:], k)
        return tokens[0], logp[0]

    def consume(self) -> tuple[torch.Tensor, int]:
        """Run the head over the target features synced since the last root.

        Returns the head's output states of the new entries [n, H] (the last one is the
        root's) and the first new entry's position. Wrappers that learn from every
        committed position (:class:`ltd.online.knn_drafter.KnnDrafter`) read them all.
        """
        if not self._pending:
            raise RuntimeError("EAGLE-3 drafter has no target features to draft from")
        feats = torch.cat(self._pending, dim=0)
        self._pending = []
        t0, n = self._consumed, feats.shape[0]
        if t0 + n + 1 > len(self._tokens):
            raise RuntimeError("more target features than committed tokens")
        nxt = torch.tensor(self._tokens[t0 + 1 : t0 + n + 1], dtype=torch.long)
        positions = torch.arange(t0, t0 + n, device=self.device).unsqueeze(0)
        allowed = torch.ones((n, t0 + n), dtype=torch.bool, device=self.device)
        allowed[:, t0:] = torch.tril(torch.ones((n, n), dtype=torch.bool, device=self.device))
        wide = self._wide_head() if n >= WIDE_ROWS else None
        if wide is None:
            out, kk, vv = self.head(
                feats.unsqueeze(0), self._embed(nxt).unsqueeze(0), positions, allowed.unsqueeze(0), self._k, self._v
            )
        else:
            f32 = torch.float32
            out, kk, vv = wide(
                feats.to(f32).unsqueeze(0), self._embed(nxt).to(f32).unsqueeze(0), positions, allowed.unsqueeze(0),
                None if self._k is None else self._k.to(f32), None if self._v is None else self._v.to(f32),
            )
            out, kk, vv = out.to(self.dtype), kk.to(self.dtype), vv.to(self.dtype)
        self._k = kk if self._k is None else torch.cat([self._k, kk], dim=2)
        self._v = vv if self._v is None else torch.cat([self._v, vv], dim=2)
        self._consumed = t0 + n
        self.node_hidden = {0: out[0, -1]}
        self._node_entry = {}
        return out[0], t0

    def _topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(self.head.logits(hidden).float(), dim=-1)
        k = min(k, logp.shape[-1])
        val, idx = torch.topk(logp, k, dim=-1)
        return self.head.draft_to_target(idx).cpu(), val.cpu()

    def vocab_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's vocabulary maps (:meth:`Eagle3Head.vocab_maps`), built once."""
        if self._vocab_maps is None:
            self._vocab_maps = self.head.vocab_maps()
        return self._vocab_maps

    @torch.inference_mode()
    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._topk(self.advance(tree, nodes), k)

    def advance(self, tree: Tree, nodes: torch.Tensor) -> torch.Tensor:
        """Run the head on drafted ``nodes`` (their parents' states known); returns their states [m, H]."""
        node_list = nodes.tolist()
        m = len(node_list)
        base = len(self._spec_parent)
        parents_entry = []
        for j, node in enumerate(node_list):
            p = int(tree.parents[node])
            parents_entry.append(-1 if p == 0 else self._node_entry[p])
            self._node_entry[node] = base + j
        all_parents = torch.tensor(self._spec_parent + parents_entry, dtype=torch.long)
        anc = ancestor_mask(all_parents)[base:].to(self.device)  # [m, base + m]
        allowed = torch.cat([torch.ones((m, self._consumed), dtype=torch.bool, device=self.device), anc], dim=1)
        depth = tree.depths[nodes].to(self.device)
        positions = (self._consumed - 1 + depth).unsqueeze(0)
        hidden = torch.stack([self.node_hidden[int(tree.parents[n])] for n in node_list]).unsqueeze(0)
        emb = self._embed(tree.tokens[nodes]).unsqueeze(0)
        past_k = torch.cat([self._k] + self._spec_k, dim=2) if self._spec_k else self._k
        past_v = torch.cat([self._v] + self._spec_v, dim=2) if self._spec_v else self._v
        out, kk, vv = self.head(hidden, emb, positions, allowed.unsqueeze(0), past_k, past_v, fuse=False)
        self._spec_k.append(kk)
        self._spec_v.append(vv)
        self._spec_parent.extend(parents_entry)
        for j, node in enumerate(node_list):
            self.node_hidden[node] = out[0, j]
        return out[0]

    def end(self) -> None:
        self._spec_k, self._spec_v, self._spec_parent = [], [], []
        self._node_entry, self.node_hidden = {}, {}
