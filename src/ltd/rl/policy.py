"""Saving trained LTD policies and building new ones for training.

The directory layout and loading for inference are :mod:`ltd.control.policy`'s; this
module writes what it reads (``model.zip`` then ``policy.json``, each atomically) and
makes fresh stable-baselines3 PPO models of the right shape.
"""

from __future__ import annotations

from pathlib import Path

from ltd.control.policy import META_FILE, MODEL_FILE, POLICY_FORMAT, POLICY_VERSION, LoadedPolicy, actor_network, check_model_spec
from ltd.control.spaces import ObsSpec
from ltd.fileio import atomic_write, atomic_write_json

DEFAULT_NET_ARCH = (64, 64)


def save_policy(model, spec: ObsSpec, directory: str | Path, meta: dict | None = None) -> Path:
    """Write ``model.zip`` then ``policy.json`` (each atomically) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    check_model_spec(model, spec, str(directory))
    atomic_write(directory / MODEL_FILE, lambda tmp: model.save(tmp), suffix=".zip")
    actions = {"n": spec.num_actions}
    actions["values"] = ["stop", "continue"] if spec.kind == "depth" else list(spec.sizes)
    atomic_write_json(directory / META_FILE, {
        "format": POLICY_FORMAT,
        "version": POLICY_VERSION,
        "kind": spec.kind,
        "observation": spec.to_json(),
        "actions": actions,
        "trained": meta or {},
    })
    return directory


class _SpaceEnv:
    """Placeholder env exposing only the spaces, to build an untrained PPO."""

    def __init__(self, spec: ObsSpec) -> None:
        import gymnasium as gym

        class Env(gym.Env):
            observation_space = spec.observation_space()
            action_space = spec.action_space()

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                return self.observation_space.sample(), {}

            def step(self, action):
                return self.observation_space.sample(), 0.0, True, False, {}

        self.env = Env()


def new_model(spec: ObsSpec, env=None, seed: int = 0, net_arch=DEFAULT_NET_ARCH, **ppo_kwargs):
    """A fresh SB3 PPO with a small MLP for ``spec`` (on ``env``, or a placeholder)."""
    from stable_baselines3 import PPO

    env = env if env is not None else _SpaceEnv(spec).env
    policy_kwargs = {"net_arch": {"pi": list(net_arch), "vf": list(net_arch)}}
    return PPO("MlpPolicy", env, seed=seed, device="cpu", policy_kwargs=policy_kwargs, verbose=0, **ppo_kwargs)


def untrained_policy(spec: ObsSpec, seed: int = 0) -> LoadedPolicy:
    """A randomly initialised policy of the right shape (profiling, tests)."""
    model = new_model(spec, seed=seed)
    return LoadedPolicy(spec, actor_network(model), {"untrained": True}, None)
