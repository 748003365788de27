"""Gymnasium environments for the LTD depth and size policies.

Each environment drives a cycle source (:mod:`ltd.rl.sources`): ``ReplaySource``
(recorded traces + latency model, thousands of times faster than the models) or
``LiveSource`` (the real drafter and target). Spaces come from :mod:`ltd.control.spaces` and
depend only on the :class:`~ltd.control.spaces.ObsSpec`, never on the source, so a policy
trained in replay runs live unchanged.

**Episodes are cycles.** The reward of a cycle is its throughput (LTD: accepted tokens,
bonus included, per second of the whole draft + select + verify + accept + commit
cycle), expressed as a speedup over one plain decoding step at that context
(``tokens / seconds * latency.ar_seconds(context)``), which keeps rewards near 1
whatever the model. Making each cycle an episode gives every decision of the cycle
exactly the cycle's reward (no discounting inside, no accumulation across cycles, which
would otherwise reward making more, shorter cycles). ``reset()`` continues the walk:
from position p the next cycle starts at p + L + 1; a finished sequence is followed by
another one drawn at random; ``reset(seed=...)`` restarts deterministically. A reset in
the middle of a cycle first finishes that cycle with the environment's fixed rule.

- :class:`DepthEnv`: one step per draft decision (0 = STOP, 1 = CONTINUE), after each
  draft step from ``spec.min_depth`` on (with min_depth 1 the first step of a cycle is
  always drafted; with 0 the agent may decode a plain token instead). When drafting stops, a size
  controller (a fixed V, or a trained size policy) chooses V.
- :class:`SizeEnv`: one step per cycle; a depth controller (a fixed depth, or a trained
  depth policy) drafts, then the action picks V from ``spec.sizes``.

Two rewards (``reward=``): ``rate`` (above: the cycle's speedup over plain decoding) and
``gain`` = tokens - seconds / ar_seconds (tokens gained over what plain decoding makes in
the same time). Total throughput is a ratio of sums, not a mean of per-cycle ratios;
``gain`` is the standard linearisation of that ratio (Dinkelbach, at the plain-decoding
rate), so a policy maximising it maximises long-run tokens/s near that rate, and a plain
step scores ~0, which makes "is this draft worth it" the sign of the reward.

Co-adaptive training alternates the two, each with the other's latest policy.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec

from ltd.control import Controller, StaticController
from ltd.errors import LtdError
from ltd.rl.sources import CycleOutcome, CycleSource, LiveSource, draft_with, size_with
from ltd.control.spaces import CONTINUE, CostView, History, ObsSpec, depth_observation, for_kind, size_observation

DEFAULT_FIXED_DEPTH = 5
DEFAULT_FIXED_SIZE = 32
REWARDS = ("rate", "gain")


def _env_spec(env_id: str, cls, kwargs: dict, nondeterministic: bool) -> EnvSpec:
    return EnvSpec(id=env_id, entry_point=cls, nondeterministic=nondeterministic, kwargs=dict(kwargs))


class _CycleEnv(gym.Env):
    """Shared episode logic: one cycle per episode, walking the source's sequences."""

    metadata = {"render_modes": []}
    kind = ""

    def __init__(self, source: CycleSource, spec: ObsSpec | None, kwargs: dict, reward: str = "rate") -> None:
        super().__init__()
        if reward not in REWARDS:
            raise LtdError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
        self.reward_kind = reward
        spec = spec or for_kind(self.kind, source.topk, source.max_depth)
        if spec.kind != self.kind:
            raise LtdError(f"a {self.kind} environment needs a {self.kind} observation spec, got {spec.kind}")
        if spec.topk != source.topk or spec.max_depth != source.max_depth:
            raise LtdError(
                f"observation spec (topk {spec.topk}, max depth {spec.max_depth}) does not match the source "
                f"(topk {source.topk}, max depth {source.max_depth})"
            )
        max_size = getattr(source, "max_size", None)
        if self.kind == "size" and max_size is not None and max(spec.sizes) > max_size:
            raise LtdError(f"size set {list(spec.sizes)} exceeds the traces' --max-size {max_size}; drop larger sizes or re-record")
        self.source = source
        self.obs_spec = spec
        self.observation_space = spec.observation_space()
        self.action_space = spec.action_space()
        live = isinstance(source, LiveSource)
        name = f"ltd/{self.kind.capitalize()}{'Live' if live else 'Replay'}-v0"
        self.spec = _env_spec(name, type(self), {"source": source, "spec": spec, "reward": reward, **kwargs}, nondeterministic=live)
        self._in_cycle = False
        self.last_outcome: CycleOutcome | None = None
        self.history = History()  # of the current sequence, as LTDController keeps it live
        self._cost_views: dict[int, CostView] = {}

    def _costs(self) -> np.ndarray | None:
        """The cost table's features at this context, for policies that observe it: the
        source's current latency model (in a cost family, the one drawn for this sequence)."""
        if not self.obs_spec.needs_costs:
            return None
        latency = self.source.latency
        view = self._cost_views.get(id(latency))
        if view is None:
            view = self._cost_views[id(latency)] = CostView(latency)
        return view.at(self.source.context_length)

    # -- hooks -------------------------------------------------------------------------
    def _begin(self) -> None:
        raise NotImplementedError

    def _obs(self) -> np.ndarray:
        raise NotImplementedError

    def _default_finish(self) -> CycleOutcome:
        raise NotImplementedError

    # -- gymnasium API -----------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        src = self.source
        if seed is not None or not src.started:
            self._in_cycle = False
            src.start(int(self.np_random.integers(src.num_sequences)))
            self.history.reset()
        elif self._in_cycle:
            out = self._default_finish()
            self.history.update(out.depth, out.accepted, out.size)
            self._in_cycle = False
        for _ in range(src.num_sequences + 1):
            if not src.done:
                break
            src.start(int(self.np_random.integers(src.num_sequences)))
            self.history.reset()
        else:
            raise LtdError("every sequence of the environment is empty; record longer outputs or give other prompts")
        self._begin()
        self._in_cycle = True
        return self._obs(), {"position": int(src.position), "context_length": int(src.context_length)}

    def _end_cycle(self, outcome: CycleOutcome) -> tuple[float, dict]:
        self._in_cycle = False
        self.last_outcome = outcome
        self.history.update(outcome.depth, outcome.accepted, outcome.size)
        unit = self.source.latency.ar_seconds(outcome.context_length - 1)
        if self.reward_kind == "gain":
            reward = float(outcome.tokens - outcome.seconds / unit) if unit > 0 else 0.0
        else:
            reward = float(outcome.tokens / outcome.seconds * unit) if outcome.seconds > 0 else 0.0
        info = {
            "cycle": {
                "position": outcome.position,
                "depth": outcome.depth,
                "size": outcome.size,
                "accepted": outcome.accepted,
                "tokens": outcome.tokens,
                "seconds": outcome.seconds,
            }
        }
        return reward, info

    def close(self) -> None:
        self._in_cycle = False


class DepthEnv(_CycleEnv):
    """Draft decisions: after each draft step, STOP (0) or CONTINUE (1)."""

    kind = "depth"

    def __init__(self, source: CycleSource, spec: ObsSpec | None = None, size_controller: Controller | None = None, reward: str = "rate") -> None:
        spec = spec or for_kind(self.kind, source.topk, source.max_depth)
        if size_controller is None:  # fixed V, within the spec's size set (the same for both backends)
            size_controller = StaticController(depth=source.max_depth, topk=source.topk, size=min(DEFAULT_FIXED_SIZE, max(spec.sizes)))
        super().__init__(source, spec, {"size_controller": size_controller}, reward)
        self.size_controller = size_controller

    def _begin(self) -> None:
        self.source.begin_cycle()
        for _ in range(self.obs_spec.min_depth):
            if self.source.can_step:
                self.source.step()

    def _obs(self) -> np.ndarray:
        src = self.source
        return depth_observation(self.obs_spec, src.depth, src.candidate_scores(), src.context_length, self.history, src.signals(),
                                 self._costs())

    def _default_finish(self) -> CycleOutcome:
        return self.source.finish(size_with(self.source, self.size_controller))

    def step(self, action):
        if not self._in_cycle:
            raise RuntimeError("call reset() to start the next cycle")
        src = self.source
        src.charge_policy("depth")  # the agent's decision is a policy call
        if int(action) == CONTINUE and src.can_step:
            src.step()
            if src.can_step:
                return self._obs(), 0.0, False, False, {}
        obs = self._obs()
        outcome = src.finish(size_with(src, self.size_controller))
        reward, info = self._end_cycle(outcome)
        return obs, reward, True, False, info


class SizeEnv(_CycleEnv):
    """Verification size: once drafting stops, action i verifies ``spec.sizes[i]`` nodes."""

    kind = "size"

    def __init__(self, source: CycleSource, spec: ObsSpec | None = None, depth_controller: Controller | None = None, reward: str = "rate") -> None:
        if depth_controller is None:
            depth = min(DEFAULT_FIXED_DEPTH, source.max_depth)
            depth_controller = StaticController(depth=depth, topk=source.topk, size=1)
        super().__init__(source, spec, {"depth_controller": depth_controller}, reward)
        self.depth_controller = depth_controller

    def _begin(self) -> None:
        self.source.begin_cycle()
        draft_with(self.source, self.depth_controller)

    def _obs(self) -> np.ndarray:
        src = self.source
        scores, depths = src.drafted_nodes()
        return size_observation(self.obs_spec, scores, depths, src.depth, src.context_length, self.history, src.signals(),
                                self._costs())

    def _default_finish(self) -> CycleOutcome:
        return self.source.finish(self.obs_spec.sizes[-1])

    def step(self, action):
        if not self._in_cycle:
            raise RuntimeError("call reset() to start the next cycle")
        src = self.source
        src.charge_policy("size")
        obs = self._obs()
        outcome = src.finish(self.obs_spec.sizes[int(action)])
        reward, info = self._end_cycle(outcome)
        return obs, reward, True, False, info


def make_env(kind: str, source: CycleSource, spec: ObsSpec | None = None, other: Controller | None = None, reward: str = "rate") -> _CycleEnv:
    """A depth or size environment; ``other`` is the controller for the other decision."""
    if kind == "depth":
        return DepthEnv(source, spec, size_controller=other, reward=reward)
    if kind == "size":
        return SizeEnv(source, spec, depth_controller=other, reward=reward)
    raise LtdError(f"unknown policy kind {kind!r}; choose depth or size")
