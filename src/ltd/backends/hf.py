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
from ltd.tree import ancestor_mask

log = logging.getLogger(__name__)


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
        toks, pars, new_depths = self._check_nodes(tokens, parents)
        n = len(toks)
        spec = self.speculative_length
        positions = torch.tensor([new_depths], dtype=torch.long, device=self.device) + self._committed
        if spec == 0 and pars == list(range(-1, n - 1)):
            mask = None  # plain causal attention: the fast path (prefill, catch-up)
        else:
            mask = self._tree_mask(pars)
        out = self.forward(toks, positions, mask, self.cache, feature_layers is not None, 1 if last_only else 0)
        self._spec_parents.extend(pars)
        self._spec_depths.extend(new_depths)
        features = None
        if feature_layers is not None:
            hs = out.hidden_states
            features = torch.cat([hs[i][0] for i in feature_layers], dim=-1)
        return TreeOutput(logits=out.logits[0].float(), features=features)

    def forward(
        self,
        tokens: list[int],
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache,
        hidden_states: bool,
        logits_to_keep: int | torch.Tensor,
    ):
        """One model forward under this backend's kernel plan: the one call that runs the
        target, shared with :class:`ltd.backends.packed.PackedHF` (several sequences in one
        forward). ``positions`` is [1, n]; ``mask`` an additive [1, 1, n, context] mask or
        None for plain causal attention."""
        planned = self._kernel_state is not None and self.kernel_plan is not None
        with (self._kernel_state.use(self.kernel_plan) if planned else contextlib.nullcontext(),
              sdpa_gqa_in_place() if planned and self._gqa_in_place else contextlib.nullcontext()):
            return self.model(
                input_ids=torch.tensor([tokens], dtype=torch.long, device=self.device),
                position_ids=positions,
                attention_mask=mask,
                cache=cache,
                use_cache=True,
                output_hidden_states=hidden_states,
                logits_to_keep=logits_to_keep,
            )

    def _tree_mask(self, parents: list[int]) -> torch.Tensor:
        """The additive [1, 1, n, context] mask of a score() call's nodes, built on the
        model's device: each node sees the committed context, its ancestors and itself."""
        spec, n = self.speculative_length, len(parents)
        total = self._committed + spec + n
        all_parents = torch.tensor(self._spec_parents + parents, dtype=torch.long, device=self.device)
        anc = ancestor_mask(all_parents, check=False)[spec:]  # [n, spec + n]; parents checked already
        mask = torch.full((1, 1, n, total), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        mask[..., : self._committed] = 0
        mask[0, 0, :, self._committed :].masked_fill_(anc, 0)
        return mask

    # -- cache surgery -----------------------------------------------------------------
    def commit(self, keep: Sequence[int] | torch.Tensor) -> None:
        keep_l = self._check_path(keep)
        k = len(keep_l)
        if keep_l == list(range(k)):
            # a prefix of the speculative entries (a chain, or a rejected draft): already
            # in place, so a view drops the rest
            if k < self.speculative_length:
                cache_ops.truncate(self.cache, self._committed + k)
        else:
            cache_ops.keep_positions(self.cache, self._committed, torch.tensor(keep_l, dtype=torch.long))
        self._committed += k
        self._spec_parents = []
        self._spec_depths = []

    def rollback(self) -> None:
        cache_ops.truncate(self.cache, self._committed)
        self._spec_parents = []
        self._spec_depths = []
