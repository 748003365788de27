"""Controllers beyond the static tree: trained LTD policies and transformers' heuristic.

Both implement :class:`ltd.controller.Controller` (``continue_drafting`` before each draft
step, ``choose_size`` once drafting stops), so they plug into :func:`ltd.cycle.decode`
unchanged; greedy output stays the target's greedy output whatever they decide.

:class:`HeuristicController` needs to know how the last cycle went: the cycle calls
every controller's ``observe_result(CycleResult)`` after each cycle (a no-op from
:class:`ltd.control.base.ControllerBase` for the LTD policies, which decide from the tree alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ltd.control.base import MAX_DEPTH, ControllerBase, validate_static
from ltd.control.policy import LoadedPolicy, load_policy
from ltd.control.spaces import CONTINUE, CostView, History, depth_observation, size_observation
from ltd.controller import DraftStepState
from ltd.cycle import CycleResult
from ltd.errors import LtdError


class LTDController(ControllerBase):
    """Depth and size decisions from trained LTD policies (deterministic actions).

    Either policy may be omitted: the depth decision then falls back to a fixed
    ``depth`` and the size decision to a fixed ``size`` (the co-adaptive trainer uses
    this to pair one trained policy with a fixed rule). ``topk`` is the branching the
    policies were trained with; decode with it (``ltd.cycle.decode(..., topk=c.topk)``).
    """

    def __init__(
        self,
        depth_policy_dir: str | Path | None = None,
        size_policy_dir: str | Path | None = None,
        *,
        depth: int = 5,
        size: int = 32,
        topk: int | None = None,
        costs=None,
    ) -> None:
        dp = load_policy(depth_policy_dir, kind="depth") if depth_policy_dir is not None else None
        sp = load_policy(size_policy_dir, kind="size") if size_policy_dir is not None else None
        self._init(dp, sp, depth, size, topk)
        self._require_costs(costs)

    def _require_costs(self, costs) -> None:
        if costs is not None:
            self.bind_costs(costs)
        elif self.needs_costs:
            raise LtdError("these LTD policies observe the machine's cost table; give the controller one "
                           "(the engine's quick profile, or --latency FILE)")

    @classmethod
    def from_policies(
        cls, depth_policy: LoadedPolicy | None, size_policy: LoadedPolicy | None, *, depth: int = 5, size: int = 32,
        topk: int | None = None, costs=None,
    ) -> "LTDController":
        """``costs``: the machine's cost table (:class:`ltd.control.costs.LatencyModel`), which
        cost-conditioned policies (observation version 4) observe; required for them."""
        self = cls.__new__(cls)
        self._init(depth_policy, size_policy, depth, size, topk)
        self._require_costs(costs)
        return self

    @property
    def needs_costs(self) -> bool:
        return any(p is not None and p.spec.needs_costs for p in (self.depth_policy, self.size_policy))

    def bind_costs(self, costs) -> None:
        """Observe ``costs`` (a LatencyModel) as this machine's cost table."""
        self._costs = CostView(costs)

    def _cost_features(self, context: int):
        return self._costs.at(context) if self._costs is not None else None

    def _init(self, dp: LoadedPolicy | None, sp: LoadedPolicy | None, depth: int, size: int, topk: int | None) -> None:
        if dp is not None and dp.spec.kind != "depth":
            raise LtdError(f"policy {dp.where} is a {dp.spec.kind} policy, but a depth policy is needed")
        if sp is not None and sp.spec.kind != "size":
            raise LtdError(f"policy {sp.where} is a {sp.spec.kind} policy, but a size policy is needed")
        if dp is not None and sp is not None:
            if (dp.spec.topk, dp.spec.max_depth) != (sp.spec.topk, sp.spec.max_depth):
                raise LtdError(
                    f"depth policy {dp.where} (topk {dp.spec.topk}, max depth {dp.spec.max_depth}) and size policy "
                    f"{sp.where} (topk {sp.spec.topk}, max depth {sp.spec.max_depth}) were trained on different trees; "
                    "use policies from the same training run"
                )
        trained = dp or sp
        if topk is None:
            topk = trained.spec.topk if trained is not None else 8
        if trained is not None and topk != trained.spec.topk:
            raise LtdError(f"policy {trained.where} was trained with topk {trained.spec.topk}, not {topk}")
        validate_static(min(depth, MAX_DEPTH), topk, size)
        self.depth_policy = dp
        self.size_policy = sp
        self.depth = depth
        self.size = size
        self.topk = topk
        self.max_depth = trained.spec.max_depth if trained is not None else depth
        self.history = History()
        self._last_context = -1
        self._costs: CostView | None = None

    def reset(self) -> None:
        """Start a new sequence: forget the drafting history."""
        self.history.reset()
        self._last_context = -1

    def observe_result(self, result: CycleResult) -> None:
        """Feed the finished cycle into the history the policies observe."""
        self.history.update(result.depth, result.num_accepted, result.size)

    def _follow(self, state: DraftStepState) -> None:
        # A shorter context than last time means a new sequence (the engine builds a
        # controller per request, but a reused one must not carry history across).
        if state.context_length < self._last_context:
            self.history.reset()
        self._last_context = state.context_length

    def asks_depth_policy(self, step: int) -> bool:
        """Whether ``continue_drafting`` at ``step`` runs the depth policy (a timed call)."""
        return self.depth_policy is not None and step >= self.depth_policy.spec.min_depth

    def _check_topk(self, state: DraftStepState) -> None:
        if state.topk != self.topk:
            raise LtdError(f"the LTD policies were trained with topk {self.topk}, but decoding uses topk {state.topk}; decode with --topk {self.topk}")

    def continue_drafting(self, state: DraftStepState) -> bool:
        self._follow(state)
        dp = self.depth_policy
        if dp is None:
            return state.step < self.depth
        if state.step < dp.spec.min_depth:
            return True
        self._check_topk(state)
        if state.step >= dp.spec.max_depth:
            return False
        obs = depth_observation(dp.spec, state.step, state.candidate_scores, state.context_length, self.history, state.signals,
                                self._cost_features(state.context_length))
        return dp.act(obs) == CONTINUE

    def depth_limit(self) -> int:
        """The fixed depth, or the deepest the depth policy was trained to draft."""
        return self.depth if self.depth_policy is None else self.depth_policy.spec.max_depth

    def choose_size(self, state: DraftStepState) -> int:
        self._follow(state)
        tree = state.tree
        sp = self.size_policy
        if sp is None:
            return min(self.size, tree.num_drafted)
        self._check_topk(state)
        obs = size_observation(sp.spec, tree.scores[1:], tree.depths[1:], tree.max_depth, state.context_length, self.history,
                               state.signals, self._cost_features(state.context_length))
        return min(sp.spec.sizes[sp.act(obs)], tree.num_drafted)


@dataclass
class HeuristicController(ControllerBase):
    """transformers' assisted-generation rule on the draft depth: +2 after a cycle that
    accepted every drafted level, -1 otherwise (within [min_depth, max_depth]); a fixed
    branching ``topk`` and verification size ``size``.

    The depth carries over from one sequence to the next, as in transformers (the
    candidate generator keeps ``num_assistant_tokens``); :meth:`reset` restores it.
    """

    depth: int = 5
    topk: int = 8
    size: int = 32
    min_depth: int = 1
    max_depth: int = 16
    current: int = field(init=False)

    def __post_init__(self) -> None:
        validate_static(self.depth, self.topk, self.size)
        if not 1 <= self.min_depth <= self.depth <= self.max_depth <= MAX_DEPTH:
            raise LtdError(
                f"heuristic depths must satisfy 1 <= min ({self.min_depth}) <= start ({self.depth}) <= max "
                f"({self.max_depth}) <= {MAX_DEPTH}"
            )
        self.current = self.depth

    def reset(self) -> None:
        self.current = self.depth

    def continue_drafting(self, state: DraftStepState) -> bool:
        return state.step < self.current

    def choose_size(self, state: DraftStepState) -> int:
        return min(self.size, state.tree.num_drafted)

    def depth_limit(self) -> int:
        return self.current

    def observe_result(self, result: CycleResult) -> None:
        """Adapt the depth to the last cycle: all drafted levels accepted -> +2, else -1."""
        if result.depth <= 0:
            return
        if result.num_accepted >= result.depth:
            self.current = min(self.current + 2, self.max_depth)
        else:
            self.current = max(self.current - 1, self.min_depth)
