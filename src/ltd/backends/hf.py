"""transformers backend: any Hugging Face causal LM, CPU or CUDA.

Tree scoring uses stock modeling code: the tree nodes go in one forward pass with
``position_ids`` = committed length + depth and a 4D additive attention mask that lets a
node see the committed context, its ancestors and itself. No modeling files are copied.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch

from ltd import cache_ops
from ltd.backends.base import SpeculativeCounters, TreeOutput
from ltd.backends.hf_kernels import (
    SDPA_GQA_WITH_MASK,
    KernelPlan,
    KernelState,
    install,
    installed_state,
    resolve_plan,
    sdpa_gqa_in_place,
)
from ltd.errors import LtdError
from ltd.tree import ancestor_mask, depths_from_parents

log = logging.getLogger(__name__)


def _as_long(x: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return x.to(torch.long).reshape(-1) if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.long)


class HFBackend(SpeculativeCounters):
    """A transformers causal LM with a committed cache and speculative entries."""

    def __init__(self, model: torch.nn.Module, kernels: str | KernelPlan = "stock") -> None:
        """``kernels``: ``stock`` (``F.linear`` everywhere), ``auto`` (this machine's measured
        plan, see :mod:`ltd.backends.hf_kernels`), ``retune``, or a :class:`KernelPlan`."""
        self.model = model.eval()
        cfg = model.config
        self.config = cfg
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._kernel_state: KernelState | None = None
        self._gqa_in_place = self.device.type == "cpu" and SDPA_GQA_WITH_MASK  # CUDA kernels want no mask
        self.kernel_plan: KernelPlan | None = None  # None: stock F.linear everywhere
        if isinstance(kernels, KernelPlan) or (kernels != "stock" and self.device.type == "cpu"):
            state = installed_state(model)
            if state is None:
                state = KernelState()
                install(model, state)
            self._kernel_state = state
            self.kernel_plan = kernels if isinstance(kernels, KernelPlan) else resolve_plan(self, kernels)
        self.reset()

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache = cache_ops.new_cache(self.config)
        self._committed = 0
        self._spec_parents: list[int] = []
        self._spec_depths: list[int] = []

    # -- scoring -----------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self,
        tokens: Sequence[int] | torch.Tensor,
        parents: Sequence[int] | torch.Tensor,
        feature_layers: Sequence[int] | None = None,
        last_only: bool = False,
    ) -> TreeOutput:
        tokens_t = _as_long(tokens)
        parents_t = _as_long(parents)
        n = int(tokens_t.numel())
        if n == 0:
            raise ValueError("score() needs at least one node")
        if parents_t.numel() != n:
            raise ValueError("tokens and parents differ in length")
        spec = self.speculative_length
        all_parents = torch.tensor(self._spec_parents + parents_t.tolist(), dtype=torch.long)
        depths = depths_from_parents(all_parents)
        new_depths = depths[spec:]
        total = self._committed + spec + n
        if self._committed + int(new_depths.max()) + 1 > self.max_context:
            raise LtdError(
                f"context of {total} tokens exceeds the model's limit of {self.max_context}; "
                "use a shorter prompt or fewer --max-new-tokens"
            )
        positions = (self._committed + new_depths).unsqueeze(0).to(self.device)
        is_chain = spec == 0 and bool(torch.equal(parents_t, torch.arange(-1, n - 1)))
        if is_chain:
            mask = None  # plain causal attention: the fast path (prefill, catch-up)
        else:
            anc = ancestor_mask(all_parents)[spec:]  # [n, spec + n]
            allowed = torch.cat([torch.ones((n, self._committed), dtype=torch.bool), anc], dim=1)
            mask = torch.zeros((1, 1, n, total), dtype=self.dtype, device=self.device)
            mask.masked_fill_(~allowed.to(self.device).view(1, 1, n, total), torch.finfo(self.dtype).min)
        planned = self._kernel_state is not None and self.kernel_plan is not None
        with (self._kernel_state.use(self.kernel_plan) if planned else contextlib.nullcontext(),
              sdpa_gqa_in_place() if planned and self._gqa_in_place else contextlib.nullcontext()):
            out = self.model(
                input_ids=tokens_t.unsqueeze(0).to(self.device),
                position_ids=positions,
                attention_mask=mask,
                cache=self.cache,
                use_cache=True,
                output_hidden_states=feature_layers is not None,
                logits_to_keep=1 if last_only else 0,
            )
        self._spec_parents.extend(parents_t.tolist())
        self._spec_depths.extend(new_depths.tolist())
        features = None
        if feature_layers is not None:
            hs = out.hidden_states
            features = torch.cat([hs[i][0] for i in feature_layers], dim=-1)
        return TreeOutput(logits=out.logits[0].float(), features=features)

    # -- cache surgery -----------------------------------------------------------------
    def commit(self, keep: Sequence[int] | torch.Tensor) -> None:
        keep_t = _as_long(keep)
        spec = self.speculative_length
        if keep_t.numel():
            if int(keep_t.max()) >= spec or int(keep_t.min()) < 0:
                raise ValueError("commit index outside the speculative entries")
            # A committed chain must be a root path: each kept node's parent is the previous.
            prev = -1
            for k in keep_t.tolist():
                if self._spec_parents[k] != prev:
                    raise ValueError("committed entries must form a path from the context")
                prev = k
        if bool(torch.equal(keep_t, torch.arange(keep_t.numel()))):
            # a prefix of the speculative entries (a chain, or a rejected draft): already
            # in place, so a view drops the rest instead of copying the whole cache
            if keep_t.numel() < spec:
                cache_ops.truncate(self.cache, self._committed + int(keep_t.numel()))
        else:
            cache_ops.keep_positions(self.cache, self._committed, keep_t)
        self._committed += int(keep_t.numel())
        self._spec_parents = []
        self._spec_depths = []

    def rollback(self) -> None:
        cache_ops.truncate(self.cache, self._committed)
        self._spec_parents = []
        self._spec_depths = []
