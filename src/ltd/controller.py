"""What the cycle asks a controller, and what it shows it while asking.

The cycle calls :meth:`Controller.continue_drafting` before each draft step and
:meth:`Controller.choose_size` once drafting stops; a drafter that drafts its whole tree
in one step is capped by :func:`depth_limit` instead of per-level answers. The protocol lives below the cycle
(which needs only these two types) and the implementations above it, in
:mod:`ltd.control`: static trees, the transformers heuristic and trained LTD policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ltd.tree import Tree


@dataclass
class DraftStepState:
    """What a controller sees while drafting.

    Attributes:
        step: draft steps done so far (0 = nothing drafted yet; the tree's depth).
        candidate_scores: cumulative scores of the candidates proposed by the last step
            (k for the first step, k*k after), empty before the first step.
        context_length: committed tokens (prompt + generated).
        tree: the tree drafted so far.
        topk: branching factor in use.
        signals: the drafter's own signals of this cycle once its root step ran (the
            suffix match: :data:`ltd.drafting.suffix.SIGNAL_FIELDS`, raw values), None
            before it or for a drafter without them. The LTD policies observe them.
    """

    step: int
    candidate_scores: torch.Tensor
    context_length: int
    tree: Tree
    topk: int
    signals: np.ndarray | None = None


class Controller(Protocol):
    """Chooses draft depth (step by step) and verification size.

    ``observe_result`` receives each finished cycle's result (accepted length, timings),
    for controllers that adapt from feedback; stateless ones ignore it.

    A controller that reads the drafter's own signals (e.g. the suffix trie's depth) may
    also define ``bind_drafter(drafter)``: the engine calls it with the drafter of the
    request before decoding, and it may refuse a drafter it cannot follow (LtdError).
    """

    def continue_drafting(self, state: DraftStepState) -> bool: ...

    def choose_size(self, state: DraftStepState) -> int: ...

    def observe_result(self, result) -> None: ...


def depth_limit(controller) -> int | None:
    """The deepest tree ``controller`` lets a cycle draft, None when it sets no cap.

    A drafter that knows its whole tree after the root hands it over in one step
    (:class:`ltd.cycle.DraftSession`), so the controller is not asked before each level:
    the cycle caps the session at this depth instead. A controller states it with an
    optional ``depth_limit()`` method (:class:`ltd.control.base.ControllerBase` answers
    None); a fixed-depth controller must answer its depth, or whole trees go deeper.
    """
    limit = getattr(controller, "depth_limit", None)
    return limit() if limit is not None else None
