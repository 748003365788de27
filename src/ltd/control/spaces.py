"""Observation and action spaces of the LTD policies, shared by every consumer.

The replay environment, the live environment and :class:`ltd.control.learned.LTDController`
all build observations with the two functions here, so a policy trained in replay sees
exactly the same numbers when it runs live.

Depth policy (action 0 = STOP, 1 = CONTINUE), asked after every draft step from step
``min_depth`` on: with ``min_depth = 1`` (the paper) every cycle drafts at least one
step; with ``min_depth = 0`` it is also asked before drafting (empty candidates), so it
can learn not to draft at all where drafting does not pay:

- ``candidate_scores`` [k*k]: cumulative log-probabilities of the candidates the last
  step proposed (k after the first step, k*k after later ones), sorted descending,
  clipped to ``[-score_clip, 0]`` and given as probabilities ``exp(score)``, padded with 0
  (log-probabilities divided by a clip squeezed the useful range, 0.05-0.9, into a few
  hundredths, and the first trained policies could not tell a sure draft from a guess);
- ``step`` [1]: draft steps done / max_depth;
- ``context`` [1]: context length / context_scale, clipped to 1;
- ``history`` [3]: how drafting has been going in this sequence (:class:`History`).

From observation version 4 on, both policies also see (before ``history``):

- ``signals`` [5]: the drafter's own signals of this cycle once its root step ran (the
  suffix match: its length, the occurrences merged, the best continuation's
  probability from counts, the trie's depth and the best chain's length; all 0 for a
  drafter without them, or before the root step). A 30-token match whose continuation
  every occurrence agrees on is a draft worth 30 tokens; the scores alone say "likely"
  without saying how far;

- ``costs`` [9]: the machine's cost table at this context, in plain steps: verifying
  1, 2, 4, ..., 64 drafted nodes (log2 of the forward's cost over a plain step's, / 4)
  and the root and later draft steps (log10 of their cost over a plain step's, + 4, / 4).
  The same policy then acts differently where verification is flat (a wide CPU, a GPU)
  and where it is steep (llama.cpp's exact build): trained over a family of cost tables
  (:func:`ltd.rl.latency.cost_family`), it fits a machine it never saw from that
  machine's quick profile, without retraining;

and ``history`` grows to [5]: the censored acceptance estimate and the last cycle's
accepted run (see :class:`History`).

Size policy (called once drafting stops; action i = verify ``sizes[i]`` nodes):

- ``tree_scores`` [max(sizes)]: the cumulative scores of the tree's best nodes in the
  order :func:`ltd.tree.select` ranks them (score descending, then shallower, then
  earlier), as probabilities like the candidates, padded with 0. Nodes ranked below
  ``max(sizes)`` can never be verified, so they are left out;
- ``tree_depths`` [max(sizes)]: the depth / max_depth of those nodes (0 = padding);
- ``depth`` [1]: the tree's depth / max_depth;
- ``context`` [1]: as above;
- ``history`` [3]: as above.

The size set may hold 0: verify none of the drafted nodes (a plain decoding step), the
right call when the tree looks too weak for its verification cost.

Why history: before the first draft step the depth policy has no candidates to look at,
so without it "draft or not" could only be a constant. Acceptance is bursty (code,
quoted text, lists), so the last drafting cycles predict the next one; and "cycles since
the last draft" lets a policy that stopped drafting learn when to probe again. Replay
and live compute it from the same cycle outcomes (depth, accepted), so it is identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ltd.errors import LtdError

OBS_VERSION = 4
SUPPORTED_OBS_VERSIONS = (3, 4)  # 3: without signals and the censored history (older shipped policies)
HISTORY_FIELDS = 3
HISTORY_FIELDS_V4 = 5
SIGNAL_COUNT = 5  # ltd.drafting.suffix.SIGNAL_FIELDS
MATCH_SCALE = 64.0  # the suffix drafter's longest measured match
RUN_SCALE = 32.0  # depths and accepted runs: the suffix drafter's deepest draft
OCCURRENCE_BITS = 6.0  # log2(1 + occurrences) / this: 32 merged occurrences ~ 0.84
COST_SIZES = (1, 2, 4, 8, 16, 32, 64)  # drafted nodes whose verification cost the policies see
COST_COUNT = len(COST_SIZES) + 2  # and the root and later draft steps
COST_CONTEXT_BUCKET = 64  # cost features are computed once per this many tokens of context
SINCE_DRAFT_SCALE = 8
HISTORY_EMA = 0.3
SCORE_CLIP = 20.0
CONTEXT_SCALE = 4096.0
DEFAULT_SIZES = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64)
STOP, CONTINUE = 0, 1
KINDS = ("depth", "size")


@dataclass(frozen=True)
class ObsSpec:
    """Everything that fixes the meaning of a policy's observation and action vectors."""

    kind: str
    topk: int
    max_depth: int
    sizes: tuple[int, ...] = field(default=DEFAULT_SIZES)
    context_scale: float = CONTEXT_SCALE
    score_clip: float = SCORE_CLIP
    min_depth: int = 1
    version: int = OBS_VERSION

    def __post_init__(self) -> None:
        if self.min_depth not in (0, 1):
            raise ValueError(f"min_depth must be 0 or 1, got {self.min_depth}")
        if self.kind not in KINDS:
            raise ValueError(f"policy kind must be one of {KINDS}, got {self.kind!r}")
        if self.topk < 1 or self.max_depth < 1:
            raise ValueError("topk and max_depth must be >= 1")
        if self.version not in SUPPORTED_OBS_VERSIONS:
            raise ValueError(f"observation version {self.version} is not one of {SUPPORTED_OBS_VERSIONS}")
        object.__setattr__(self, "sizes", tuple(int(v) for v in self.sizes))
        if not self.sizes or any(v < 0 for v in self.sizes) or list(self.sizes) != sorted(set(self.sizes)) or max(self.sizes) < 1:
            raise ValueError(f"sizes must be distinct increasing integers >= 0 (at least one positive), got {self.sizes}")

    # -- layout ------------------------------------------------------------------------
    @property
    def size_nodes(self) -> int:
        """Tree nodes the size observation describes (the largest verification size)."""
        return max(self.sizes)

    def fields(self) -> list[tuple[str, int]]:
        """(name, length) of each part of the observation vector, in order."""
        tail = ([("history", HISTORY_FIELDS)] if self.version < 4
                else [("signals", SIGNAL_COUNT), ("costs", COST_COUNT), ("history", HISTORY_FIELDS_V4)])
        if self.kind == "depth":
            return [("candidate_scores", self.topk * self.topk), ("step", 1), ("context", 1), *tail]
        n = self.size_nodes
        return [("tree_scores", n), ("tree_depths", n), ("depth", 1), ("context", 1), *tail]

    def field(self, obs: np.ndarray, name: str) -> np.ndarray:
        """The part ``name`` of an observation vector, located by :meth:`fields`."""
        start = 0
        for field_name, length in self.fields():
            if field_name == name:
                return obs[start : start + length]
            start += length
        raise KeyError(f"{self.kind} observations have no field {name!r}")

    @property
    def needs_costs(self) -> bool:
        """Whether the observation holds the machine's cost table (version 4 on)."""
        return self.version >= 4

    @property
    def dim(self) -> int:
        return sum(n for _, n in self.fields())

    @property
    def num_actions(self) -> int:
        return 2 if self.kind == "depth" else len(self.sizes)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Every field lies in [0, 1] (scores as probabilities, fractions, normalised counts)."""
        return np.zeros(self.dim, dtype=np.float32), np.ones(self.dim, dtype=np.float32)

    def observation_space(self):
        from gymnasium import spaces

        low, high = self.bounds()
        return spaces.Box(low=low, high=high, dtype=np.float32)

    def action_space(self):
        from gymnasium import spaces

        return spaces.Discrete(self.num_actions)

    # -- persistence -------------------------------------------------------------------
    def to_json(self) -> dict:
        data = asdict(self)
        data["sizes"] = list(self.sizes)
        data["fields"] = [{"name": n, "size": s} for n, s in self.fields()]
        data["dim"] = self.dim
        return data

    @staticmethod
    def from_json(data: dict) -> "ObsSpec":
        keys = ("kind", "topk", "max_depth", "sizes", "context_scale", "score_clip", "min_depth", "version")
        missing = [k for k in keys if k not in data]
        if missing:
            raise LtdError(f"policy observation spec lacks {', '.join(missing)}; retrain the policy")
        try:
            spec = ObsSpec(
                kind=str(data["kind"]),
                topk=int(data["topk"]),
                max_depth=int(data["max_depth"]),
                sizes=tuple(int(v) for v in data["sizes"]),
                context_scale=float(data["context_scale"]),
                score_clip=float(data["score_clip"]),
                min_depth=int(data["min_depth"]),
                version=int(data["version"]),
            )
        except ValueError as exc:
            raise LtdError(f"policy observation spec: {exc}; retrain the policy") from None
        stored = [(f["name"], int(f["size"])) for f in data.get("fields", [])]
        if stored and stored != spec.fields():
            raise LtdError(
                f"policy observation layout {stored} differs from what this version of ltd builds "
                f"{spec.fields()}; retrain the policy"
            )
        return spec

    def mismatch(self, other: "ObsSpec") -> str | None:
        """A one-line reason why a policy with spec ``other`` cannot stand in for ``self``."""
        checks = [("kind", self.kind, other.kind), ("observation version", self.version, other.version),
                  ("topk", self.topk, other.topk), ("max depth", self.max_depth, other.max_depth),
                  ("context scale", self.context_scale, other.context_scale),
                  ("score clip", self.score_clip, other.score_clip)]
        if self.kind == "size":
            checks.append(("size set", list(self.sizes), list(other.sizes)))
        else:
            checks.append(("min depth", self.min_depth, other.min_depth))
        for name, want, got in checks:
            if want != got:
                return f"{name} {got} (expected {want})"
        return None


def for_kind(kind: str, topk: int, max_depth: int, sizes: Sequence[int] = DEFAULT_SIZES, **kw) -> ObsSpec:
    return ObsSpec(kind=kind, topk=topk, max_depth=max_depth, sizes=tuple(sizes), **kw)


def sizes_up_to(max_size: int | None, sizes: Sequence[int] = DEFAULT_SIZES) -> tuple[int, ...]:
    """The size set limited to ``max_size`` (which is added when it falls between values)."""
    if max_size is None:
        return tuple(sizes)
    kept = [v for v in sizes if v <= max_size]
    if not kept or kept[-1] != max_size:
        kept.append(int(max_size))
    return tuple(sorted(set(kept)))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32).reshape(-1)


def _norm_scores(scores: np.ndarray, clip: float) -> np.ndarray:
    scores = np.nan_to_num(scores, nan=-clip, neginf=-clip, posinf=0.0)
    return np.exp(np.clip(scores, -clip, 0.0)).astype(np.float32)


@dataclass
class History:
    """How drafting went in the current sequence, as the policies see it.

    Updated from every finished cycle with its draft depth and accepted drafted tokens
    (cycles that did not draft only advance ``since_draft``). Features, all in [0, 1]:
    the last drafting cycle's accepted fraction (accepted / depth), an exponential
    average of that fraction (weight ``HISTORY_EMA`` on the newest), and cycles since
    the last drafting cycle / ``SINCE_DRAFT_SCALE`` (clipped; 1 at the start).

    Observation version 4 adds two:

    - the **censored acceptance estimate**: the chance that the next drafted token on the
      path is accepted, from recent cycles. A cycle that accepted L of its drafted levels
      and stopped short shows L acceptances and one rejection; a cycle that accepted all
      it could (L >= min(depth, size)) shows L acceptances and no rejection, since it only
      proves acceptance runs at least that far (it is censored, not an average). The
      estimate is the censored geometric MLE, acceptances / (acceptances + rejections),
      over exponentially decayed counts (weight ``1 - HISTORY_EMA`` per cycle on the
      past). A run of fully accepted deep drafts drives it to 1, where the fraction
      ``accepted / depth`` would stay at 1 whether the draft was 2 or 30 deep;
    - the last drafting cycle's accepted run / ``RUN_SCALE`` (clipped): how far it went.
    """

    last_fraction: float = 0.0
    mean_fraction: float = 0.0
    since_draft: int = SINCE_DRAFT_SCALE
    drafted_cycles: int = 0
    accepts: float = 0.0  # decayed accepted drafted tokens
    rejects: float = 0.0  # decayed observed rejections (cycles that stopped short)
    last_run: int = 0

    def reset(self) -> None:
        self.last_fraction, self.mean_fraction, self.since_draft, self.drafted_cycles = 0.0, 0.0, SINCE_DRAFT_SCALE, 0
        self.accepts, self.rejects, self.last_run = 0.0, 0.0, 0

    @property
    def acceptance(self) -> float:
        """The censored acceptance estimate (0 before any drafting cycle)."""
        total = self.accepts + self.rejects
        return self.accepts / total if total > 0 else 0.0

    def update(self, depth: int, accepted: int, size: int | None = None) -> None:
        """Record one finished cycle (``size`` 0 means nothing drafted was verified)."""
        if depth <= 0 or size == 0:
            self.since_draft = min(self.since_draft + 1, SINCE_DRAFT_SCALE)
            return
        reach = depth if size is None else min(depth, size)  # the longest run this cycle could accept
        censored = accepted >= reach
        self.accepts = (1 - HISTORY_EMA) * self.accepts + accepted
        self.rejects = (1 - HISTORY_EMA) * self.rejects + (0.0 if censored else 1.0)
        self.last_run = accepted
        frac = min(max(accepted / depth, 0.0), 1.0)
        if self.drafted_cycles == 0:
            self.mean_fraction = frac
        else:
            self.mean_fraction = (1 - HISTORY_EMA) * self.mean_fraction + HISTORY_EMA * frac
        self.last_fraction = frac
        self.since_draft = 0
        self.drafted_cycles += 1

    def features(self, version: int = 3) -> np.ndarray:
        base = [self.last_fraction, self.mean_fraction, self.since_draft / SINCE_DRAFT_SCALE]
        if version >= 4:
            base += [self.acceptance, min(self.last_run / RUN_SCALE, 1.0)]
        return np.array(base, dtype=np.float32)


def _history(history: "History | None", version: int) -> np.ndarray:
    return (history or History()).features(version)


def signal_features(signals) -> np.ndarray:
    """The drafter's raw signals (:data:`ltd.drafting.suffix.SIGNAL_FIELDS`) scaled into [0, 1]; zeros without them."""
    out = np.zeros(SIGNAL_COUNT, dtype=np.float32)
    if signals is None:
        return out
    raw = np.asarray(signals, dtype=np.float64).reshape(-1)
    if raw.size != SIGNAL_COUNT:
        raise ValueError(f"expected {SIGNAL_COUNT} drafter signals, got {raw.size}")
    match, occurrences, best_prob, depth, chain = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0).tolist()
    out[:] = [match / MATCH_SCALE, np.log2(1.0 + max(occurrences, 0.0)) / OCCURRENCE_BITS, best_prob,
              depth / RUN_SCALE, chain / RUN_SCALE]
    return np.clip(out, 0.0, 1.0)


def cost_features(costs, context: int) -> np.ndarray:
    """The cost table's :data:`COST_COUNT` features at ``context`` (see the module docstring).

    ``costs`` is a :class:`ltd.control.costs.LatencyModel`: the machine's quick profile or
    a full ``ltd profile``. Everything is relative to one plain step, so the features
    describe the curve's shape, not the machine's speed."""
    plain = costs.ar_seconds(context)
    if plain <= 0:
        raise ValueError("the cost table gives a plain step no time; re-run ltd profile")
    curve = costs.verify_curve(max(COST_SIZES) + 1, context)
    over = costs.cycle_overhead_seconds
    verify = np.array([(curve[n] + over) / plain for n in COST_SIZES])
    steps = np.array([costs.draft_step(0), costs.draft_step(1)]) / plain
    out = np.concatenate([np.log2(np.maximum(verify, 1e-6)) / 4.0, (np.log10(np.maximum(steps, 1e-6)) + 4.0) / 4.0])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class CostView:
    """:func:`cost_features` of one cost table, cached by context bucket (a policy call
    must stay cheap: the cost curve moves little within :data:`COST_CONTEXT_BUCKET` tokens)."""

    def __init__(self, costs) -> None:
        self.costs = costs
        self._cache: dict[int, np.ndarray] = {}

    def at(self, context: int) -> np.ndarray:
        bucket = int(context) // COST_CONTEXT_BUCKET
        got = self._cache.get(bucket)
        if got is None:
            got = self._cache[bucket] = cost_features(self.costs, bucket * COST_CONTEXT_BUCKET + COST_CONTEXT_BUCKET // 2)
        return got


def _tail(spec: ObsSpec, history: "History | None", signals, costs: np.ndarray | None) -> np.ndarray:
    """The fields after the context: (signals, costs,) history, as the spec's version lays them out."""
    if spec.version < 4:
        return _history(history, spec.version)
    if costs is None:
        raise LtdError("this policy observes the machine's cost table, and none was given; pass the costs "
                       "(the engine's quick profile or an ltd profile file)")
    costs = np.asarray(costs, dtype=np.float32).reshape(-1)
    if costs.size != COST_COUNT:
        raise LtdError(f"cost features have {costs.size} values, the policy expects {COST_COUNT}; retrain it")
    return np.concatenate([signal_features(signals), costs, _history(history, spec.version)])


def depth_observation(spec: ObsSpec, step: int, candidate_scores, context_length: int, history: History | None = None,
                      signals=None, costs: np.ndarray | None = None) -> np.ndarray:
    """The depth policy's observation after ``step`` draft steps."""
    kk = spec.topk * spec.topk
    obs = np.empty(spec.dim, dtype=np.float32)
    obs[:kk] = 0.0
    cand = _to_numpy(candidate_scores)
    if cand.size:
        top = -np.sort(-cand)[:kk]
        obs[: top.size] = _norm_scores(top, spec.score_clip)
    obs[kk] = min(step / spec.max_depth, 1.0)
    obs[kk + 1] = min(context_length / spec.context_scale, 1.0)
    obs[kk + 2 :] = _tail(spec, history, signals, costs)
    return obs


def rank_order(scores: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """Indices in :func:`ltd.tree.select`'s ranking: score desc, depth asc, index asc."""
    idx = np.arange(scores.size)
    return np.lexsort((idx, depths, -scores))


def size_observation(spec: ObsSpec, scores, depths, tree_depth: int, context_length: int, history: History | None = None,
                     signals=None, costs: np.ndarray | None = None) -> np.ndarray:
    """The size policy's observation for a drafted tree.

    ``scores``/``depths`` are those of the drafted nodes (root excluded), in tree order.
    """
    n = spec.size_nodes
    obs = np.zeros(spec.dim, dtype=np.float32)
    obs[:n] = 0.0
    s = _to_numpy(scores)
    if s.size:
        d = np.asarray(depths.detach().cpu().numpy() if hasattr(depths, "detach") else depths).reshape(-1)
        top = rank_order(s, d)[:n]
        obs[: top.size] = _norm_scores(s[top], spec.score_clip)
        obs[n : n + top.size] = np.minimum(d[top] / spec.max_depth, 1.0)
    obs[2 * n] = min(tree_depth / spec.max_depth, 1.0)
    obs[2 * n + 1] = min(context_length / spec.context_scale, 1.0)
    obs[2 * n + 2 :] = _tail(spec, history, signals, costs)
    return obs
