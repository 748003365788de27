"""Shrinking a head's draft vocabulary to a size budget, without retraining."""

from __future__ import annotations

import torch

from ltd.drafting.eagle3.model import Eagle3Config, Eagle3Head
from ltd.errors import LtdError

def shrink_draft_vocab(head: Eagle3Head, keep_target_ids: torch.Tensor) -> Eagle3Head:
    """A copy of ``head`` whose draft vocabulary is ``keep_target_ids`` (a subset of its own).

    Why: the output layer is most of a head's bytes (draft vocab x hidden); a head trained
    with a large draft vocabulary can be cut to a size budget without retraining, dropping
    the rarest tokens, whose rows the selection seldom reaches anyway.
    """
    _, row_of = head.vocab_maps()
    keep = torch.unique(keep_target_ids.to(torch.long).cpu())  # sorted
    rows = torch.full_like(keep, -1)
    inside = (keep >= 0) & (keep < row_of.numel())  # ids outside the target vocabulary are lacking too
    rows[inside] = row_of[keep[inside]]
    if bool((rows < 0).any()):
        missing = int(keep[rows < 0][0])
        raise LtdError(f"cannot shrink the draft vocabulary to tokens it lacks (e.g. target id {missing}); keep a subset of it")
    cfg = Eagle3Config.from_json_dict({**head.config.to_json_dict(), "draft_vocab_size": int(keep.numel())})
    small = Eagle3Head(cfg).to(dtype=head.lm_head.weight.dtype)
    state = {k: v for k, v in head.state_dict().items() if k not in ("lm_head.weight", "d2t", "t2d")}
    state["lm_head.weight"] = head.lm_head.weight.detach().cpu()[rows]
    state["d2t"], state["t2d"] = small.d2t, small.t2d
    small.load_state_dict(state, strict=True)
    small.set_vocab_map(keep)
    return small
