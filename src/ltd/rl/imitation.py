"""Warm-starting the LTD policies by imitation, before PPO.

Why: PPO from a random policy, on a few thousand cycles of replay, settled on the best
static tree or below it (replay on alpaca traces, 2026-11-27: 34.1 and 29.3 tokens/s against
the fixed tree's 34.9 and 33.7). A size rule read off the same observation does better:
the draft scores are probabilities (the n-gram drafter's are calibrated, the head's are
its softmax), so verifying the V best nodes should add about ``sum of their
probabilities`` tokens, and the latency profile says what that V costs. The rule that
maximises ``(1 + expected accepted tokens) / modelled cycle time`` beat the static tree
in replay where PPO alone did not. Cloning it gives PPO a starting point that is already
good; PPO then adjusts it with what the rule cannot see (acceptance history, how far the
scores are off), and every phase is still evaluated against the fixed rule.

Teachers act on the observation vector alone (:mod:`ltd.control.spaces`), so the cloned
policy sees exactly what the teacher saw.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from ltd.rl.latency import LatencyModel
from ltd.control.spaces import CONTINUE, STOP, ObsSpec

log = logging.getLogger(__name__)

Teacher = Callable[[np.ndarray], int]
WARM_STARTS = ("none", "expected-value")


def expected_value_teacher(spec: ObsSpec, latency: LatencyModel | Callable[[], LatencyModel]) -> Teacher:
    """Size rule: the action whose V maximises expected tokens per modelled second
    (``latency`` may be a function giving the cost table of the current cycle)."""

    def act(obs: np.ndarray) -> int:
        costs = latency() if callable(latency) else latency
        probs = np.asarray(spec.field(obs, "tree_scores"), dtype=np.float64)
        gain = np.concatenate([[0.0], np.cumsum(probs)])
        depth = int(round(float(spec.field(obs, "depth")[0]) * spec.max_depth))
        context = int(float(spec.field(obs, "context")[0]) * spec.context_scale)
        drafted = int(np.count_nonzero(probs))
        verified = [min(v, drafted) for v in spec.sizes]
        rates = [(1.0 + gain[v]) / costs.cycle_seconds(depth, v, context) for v in verified]
        return int(np.argmax(rates))

    return act


def fixed_depth_teacher(spec: ObsSpec, depth: int) -> Teacher:
    """Depth rule: continue until ``depth`` draft steps (the fixed rule the size phase used)."""

    def act(obs: np.ndarray) -> int:
        step = int(round(float(spec.field(obs, "step")[0]) * spec.max_depth))
        return CONTINUE if step < depth else STOP

    return act


def collect(env, teacher: Teacher, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Observations met while acting as ``teacher`` does, with its actions."""
    obs, _ = env.reset(seed=seed)
    xs, ys = [], []
    for _ in range(steps):
        action = teacher(obs)
        xs.append(np.asarray(obs, dtype=np.float32))
        ys.append(action)
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def clone(model, obs: np.ndarray, actions: np.ndarray, epochs: int = 30, batch_size: int = 256, lr: float = 1e-3, seed: int = 0) -> float:
    """Fit the PPO actor to the teacher's actions (cross-entropy); returns its agreement."""
    policy = model.policy
    x = torch.as_tensor(obs)
    y = torch.as_tensor(actions)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    policy.set_training_mode(True)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            _, log_prob, _ = policy.evaluate_actions(x[idx], y[idx])
            loss = -log_prob.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    policy.set_training_mode(False)
    with torch.no_grad():
        predicted, _, _ = policy(x, deterministic=True)
    agreement = float((predicted.reshape(-1) == y).float().mean())
    log.info("imitation: %d decisions, %.1f%% agree with the teacher", x.shape[0], 100 * agreement)
    return agreement


def teacher_for(kind: str, spec: ObsSpec, latency: LatencyModel | Callable[[], LatencyModel], fixed_depth: int) -> Teacher:
    return expected_value_teacher(spec, latency) if kind == "size" else fixed_depth_teacher(spec, fixed_depth)
