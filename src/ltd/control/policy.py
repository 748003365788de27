"""Trained LTD policies on disk, loaded for inference.

Layout of a policy directory::

    model.zip     stable-baselines3 PPO (the whole algorithm: training can resume from it)
    policy.json   format, version, kind, the observation spec (field names and sizes,
                  size set, topk, max depth, normalisation), actions, training metadata

``policy.json`` is written last (by :func:`ltd.rl.policy.save_policy`), so a directory
without it is an unfinished save. Loading checks everything that fixes the meaning of
the vectors; a policy trained for another topk, depth, size set or observation version
is refused with a one-line :class:`~ltd.errors.LtdError` rather than silently fed
vectors it was not trained on.

At decision time only the actor is used: :class:`LoadedPolicy` keeps the SB3 actor MLP
and action head as one small torch module and takes the argmax (the deterministic
action), which costs tens of microseconds per call on a CPU (a few with
:class:`NumpyMLP`). Training lives in :mod:`ltd.rl`; this module needs
stable-baselines3 only to read ``model.zip``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ltd.control.spaces import ObsSpec
from ltd.errors import LtdError
from ltd.fileio import read_json

log = logging.getLogger(__name__)

POLICY_FORMAT = "ltd-policy"
POLICY_VERSION = 1
MODEL_FILE = "model.zip"
META_FILE = "policy.json"
POLICY_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "policies"


class NumpyMLP:
    """The actor as plain numpy matmuls: a few microseconds per call instead of the tens
    that torch's per-op dispatch costs for such small layers."""

    ACTIVATIONS = {torch.nn.Tanh: np.tanh, torch.nn.ReLU: lambda x: np.maximum(x, 0.0)}

    def __init__(self, layers: list) -> None:
        self.layers = layers  # (weight.T, bias) tuples and activation functions, in order

    @staticmethod
    def from_module(net: torch.nn.Module) -> "NumpyMLP | None":
        """None when the module holds something other than Linear/Tanh/ReLU/Flatten."""
        layers = []
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight.detach().cpu().numpy().astype(np.float32).T.copy()
                b = (m.bias.detach().cpu().numpy().astype(np.float32) if m.bias is not None else np.zeros(w.shape[1], np.float32))
                layers.append((w, b))
            elif type(m) in NumpyMLP.ACTIVATIONS:
                layers.append(NumpyMLP.ACTIVATIONS[type(m)])
            elif list(m.children()) or isinstance(m, (torch.nn.Flatten, torch.nn.Identity)):
                continue  # containers (their leaves come next) and no-ops on a flat vector
            else:
                return None
        return NumpyMLP(layers) if layers else None

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = obs
        for layer in self.layers:
            x = x @ layer[0] + layer[1] if isinstance(layer, tuple) else layer(x)
        return x


@dataclass
class LoadedPolicy:
    """A policy ready for inference: ``act(obs) -> action index``."""

    spec: ObsSpec
    net: torch.nn.Module
    meta: dict = field(default_factory=dict)
    directory: Path | None = None
    fast: NumpyMLP | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.fast is None:
            self.fast = NumpyMLP.from_module(self.net)

    @torch.inference_mode()
    def logits(self, obs: np.ndarray) -> torch.Tensor:
        return self.net(torch.from_numpy(np.asarray(obs, dtype=np.float32)).unsqueeze(0))[0]

    def act(self, obs: np.ndarray) -> int:
        """The deterministic action (argmax of the action logits)."""
        if self.fast is not None:
            return int(np.argmax(self.fast(np.asarray(obs, dtype=np.float32))))
        return int(torch.argmax(self.logits(obs)))

    @property
    def where(self) -> str:
        return str(self.directory) if self.directory is not None else "(in memory)"


def actor_network(model) -> torch.nn.Module:
    """The SB3 policy's actor as one module: observation [b, dim] -> logits [b, actions]."""
    policy = model.policy if hasattr(model, "policy") else model
    net = torch.nn.Sequential(policy.features_extractor, policy.mlp_extractor.policy_net, policy.action_net)
    return net.eval().to("cpu")


def check_model_spec(model, spec: ObsSpec, where: str) -> None:
    shape = tuple(model.observation_space.shape or ())
    n = int(getattr(model.action_space, "n", -1))
    if shape != (spec.dim,) or n != spec.num_actions:
        raise LtdError(
            f"policy {where} has observation shape {shape} and {n} actions, but its spec says "
            f"({spec.dim},) and {spec.num_actions}; retrain it"
        )


def read_policy_meta(directory: str | Path) -> tuple[ObsSpec, dict]:
    """The spec and metadata of a policy directory, validated (no model is loaded)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LtdError(f"policy directory {directory} does not exist; train one with ltd train-policy")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise LtdError(f"{directory} holds no {META_FILE}; it is not a finished LTD policy (retrain or pick another)")
    meta = read_json(meta_path, "policy metadata")
    if meta.get("format") != POLICY_FORMAT:
        raise LtdError(f"{meta_path} is not an LTD policy (format {meta.get('format')!r})")
    if int(meta.get("version", -1)) != POLICY_VERSION:
        raise LtdError(f"policy {directory} has version {meta.get('version')}, this ltd reads {POLICY_VERSION}; retrain it")
    obs = meta.get("observation")
    if not isinstance(obs, dict):
        raise LtdError(f"{meta_path} has no observation spec; retrain the policy")
    try:  # the spec refuses versions this ltd does not read (and any other malformed field)
        spec = ObsSpec.from_json(obs)
    except LtdError as exc:
        raise LtdError(f"policy {directory}: {exc}") from None
    if spec.kind != meta.get("kind"):
        raise LtdError(f"{meta_path} is inconsistent (kind {meta.get('kind')!r} vs observation kind {spec.kind!r}); retrain")
    return spec, meta


def check_spec(spec: ObsSpec, expect: ObsSpec | None, kind: str | None, where: str) -> None:
    """One-line refusal when a policy does not fit what the caller needs."""
    if kind is not None and spec.kind != kind:
        raise LtdError(f"policy {where} is a {spec.kind} policy, but a {kind} policy is needed")
    if expect is not None:
        reason = expect.mismatch(spec)
        if reason is not None:
            raise LtdError(f"policy {where} does not match: it has {reason}; use a matching policy or retrain")


def load_model(directory: str | Path, env=None):
    """The SB3 PPO stored in a policy directory (for inference and for resuming training)."""
    from stable_baselines3 import PPO  # optional (the rl extra) and slow to import: only when a policy loads

    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise LtdError(f"{Path(directory)} holds no {MODEL_FILE}; retrain the policy")
    try:
        return PPO.load(str(path), env=env, device="cpu")
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LtdError(f"cannot load {path} ({first}); retrain the policy") from None


def load_policy(directory: str | Path, kind: str | None = None, expect: ObsSpec | None = None) -> LoadedPolicy:
    """Load a policy for inference, refusing one whose spec does not fit."""
    directory = Path(directory)
    spec, meta = read_policy_meta(directory)
    check_spec(spec, expect, kind, str(directory))
    model = load_model(directory)
    check_model_spec(model, spec, str(directory))
    return LoadedPolicy(spec, actor_network(model), meta, directory)




def default_policy_dir(model_name: str, backend: str = "hf") -> Path:
    """Where the shipped LTD policies for a registry model and backend live.

    Policies are trained on one backend's latency profile and drafter (the hf backend's
    EAGLE-3 hybrid, llama.cpp's n-grams), so each backend has its own: ``NAME`` for hf,
    ``NAME-llamacpp`` for llama.cpp.
    """
    return POLICY_ASSETS / (model_name if backend == "hf" else f"{model_name}-{backend}")


def load_ltd_policies(policy_dir: str | Path) -> tuple[LoadedPolicy | None, LoadedPolicy | None]:
    """The (depth, size) policies in a directory holding ``depth/`` and/or ``size/``."""
    d = Path(policy_dir)
    if not (d / "depth").is_dir() and not (d / "size").is_dir():
        raise LtdError(f"no LTD policies in {d} (expected depth/ and size/); train them with ltd train-policy or pass --policy")
    dp = load_policy(d / "depth", kind="depth") if (d / "depth").is_dir() else None
    sp = load_policy(d / "size", kind="size") if (d / "size").is_dir() else None
    return dp, sp
