"""PPO training of the LTD policies (stable-baselines3), with the co-adaptive schedule.

Stages: ``size`` (size policy, fixed depth rule), ``depth`` (depth policy, fixed size
rule) or ``both``: size with the fixed depth rule, then depth with the trained size
policy, then size with the trained depth policy, ... (``rounds`` depth phases, always
ending with size). Every phase is one PPO run of ``iterations`` rollouts of ``n_steps``.

Output directory::

    OUT/train_state.json         config + per-phase status (resume reads it)
    OUT/phases/NN-KIND/          checkpoint.zip (every few iterations), policy/ when done
    OUT/depth/, OUT/size/        the latest finished policy of each kind (LTDController)
    OUT/tb/NN-KIND_1/            TensorBoard logs (PPO's + ltd/* throughput metrics)
    OUT/summary.json             final evaluation (replay throughput vs oracle)

Everything is written atomically; ``resume=True`` skips finished phases and continues
an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ltd.control import LTDController, StaticController
from ltd.control.policy import load_policy
from ltd.control.spaces import DEFAULT_SIZES, ObsSpec, for_kind, sizes_up_to
from ltd.errors import LtdError
from ltd.fileio import atomic_write, atomic_write_json, read_json
from ltd.rl.envs import make_env
from ltd.rl.imitation import WARM_STARTS, clone, collect, teacher_for
from ltd.rl.latency import LatencyModel
from ltd.rl.oracle import compare
from ltd.rl.policy import new_model, save_policy
from ltd.rl.sources import ReplaySource
from ltd.rl.traces import TraceSet

log = logging.getLogger(__name__)

STAGES = ("size", "depth", "both")
ENVS = ("replay", "live")
STATE_FILE = "train_state.json"
STATE_FORMAT = "ltd-train-state"
CHECKPOINT = "checkpoint.zip"
# config fields that may change when resuming (they do not change what is learned so far)
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "eval_sequences")


@dataclass
class PolicyTrainConfig:
    """PPO and schedule settings (defaults suit the replay environment)."""

    stage: str = "both"
    env: str = "replay"
    iterations: int = 20
    rounds: int = 1
    n_steps: int = 512
    batch_size: int = 128
    n_epochs: int = 5
    learning_rate: float = 3e-4
    gamma: float = 1.0  # episodes are single cycles (see ltd.rl.envs)
    gae_lambda: float = 0.95
    ent_coef: float = 0.01
    net_arch: tuple[int, ...] = (64, 64)
    sizes: tuple[int, ...] = DEFAULT_SIZES
    fixed_depth: int = 5
    fixed_size: int = 32
    min_depth: int = 1  # 0: the depth policy may also choose not to draft (see ltd.control.spaces)
    reward: str = "rate"  # rate | gain (see ltd.rl.envs)
    seed: int = 0
    checkpoint_every: int = 5
    eval_sequences: int = 32
    warm_start: str = "none"  # none | expected-value: clone a rule before PPO (ltd.rl.imitation)
    warm_steps: int = 8192

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise LtdError(f"unknown --stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.env not in ENVS:
            raise LtdError(f"unknown --env {self.env!r}; choose replay or live")
        for name in ("iterations", "rounds", "n_steps", "batch_size", "n_epochs", "checkpoint_every", "fixed_depth", "fixed_size"):
            if getattr(self, name) < 1:
                raise LtdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.min_depth not in (0, 1):
            raise LtdError(f"--min-depth must be 0 or 1, got {self.min_depth}")
        if self.ent_coef < 0:
            raise LtdError(f"--ent-coef must be >= 0, got {self.ent_coef}")
        if self.reward not in ("rate", "gain"):
            raise LtdError(f"--reward must be rate or gain, got {self.reward!r}")
        if self.n_steps < 2:
            raise LtdError("--n-steps must be at least 2")
        if self.warm_start not in WARM_STARTS:
            raise LtdError(f"unknown --warm-start {self.warm_start!r}; choose one of {', '.join(WARM_STARTS)}")
        if self.warm_steps < 1:
            raise LtdError(f"--warm-steps must be at least 1, got {self.warm_steps}")
        if self.batch_size > self.n_steps:
            raise LtdError(f"--batch-size {self.batch_size} exceeds --n-steps {self.n_steps}")

    def phases(self) -> list[str]:
        if self.stage == "both":
            return ["size", "depth"] * self.rounds + ["size"]
        return [self.stage]

    def to_json(self) -> dict:
        data = asdict(self)
        data["net_arch"] = list(self.net_arch)
        data["sizes"] = list(self.sizes)
        return data


@dataclass
class TrainResult:
    out_dir: Path
    depth_policy: Path | None
    size_policy: Path | None
    phases: list[dict] = field(default_factory=list)
    evaluation: dict | None = None


def _make_callback(checkpoint: Path, every: int, on_checkpoint: Callable[[int], None]):
    from stable_baselines3.common.callbacks import BaseCallback

    class ThroughputCallback(BaseCallback):
        """Logs cycle throughput per rollout; checkpoints every ``every`` iterations."""

        def __init__(self) -> None:
            super().__init__()
            self._reset_stats()
            self.iterations = 0

        def _reset_stats(self) -> None:
            self.tokens = 0
            self.seconds = 0.0
            self.cycles = 0
            self.depth = 0
            self.size = 0

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                cyc = info.get("cycle")
                if cyc is not None:
                    self.tokens += cyc["tokens"]
                    self.seconds += cyc["seconds"]
                    self.cycles += 1
                    self.depth += cyc["depth"]
                    self.size += cyc["size"]
            return True

        def _on_rollout_start(self) -> None:
            # parameters here already include the previous iteration's update
            if self.iterations and self.iterations % every == 0:
                atomic_write(checkpoint, lambda tmp: self.model.save(tmp), suffix=".zip")
                on_checkpoint(self.model.num_timesteps)

        def _on_rollout_end(self) -> None:
            self.iterations += 1
            if self.cycles:
                self.logger.record("ltd/tokens_per_second", self.tokens / self.seconds if self.seconds else 0.0)
                self.logger.record("ltd/tokens_per_cycle", self.tokens / self.cycles)
                self.logger.record("ltd/mean_depth", self.depth / self.cycles)
                self.logger.record("ltd/mean_size", self.size / self.cycles)
            self._reset_stats()

    return ThroughputCallback()


def _load_state(out_dir: Path, cfg: PolicyTrainConfig, resume: bool, inputs: dict) -> dict:
    path = out_dir / STATE_FILE
    if not path.exists():
        if resume:
            log.info("nothing to resume in %s; starting fresh", out_dir)
        return {"format": STATE_FORMAT, "config": cfg.to_json(), "inputs": inputs,
                "phases": [{"index": i, "kind": k, "status": "pending", "timesteps": 0} for i, k in enumerate(cfg.phases())]}
    if not resume:
        raise LtdError(f"{out_dir} already holds a policy training run; pass --resume to continue it or choose another --out")
    state = read_json(path, "training state")
    if state.get("format") != STATE_FORMAT:
        raise LtdError(f"{path} is not an ltd training state; choose another --out")
    defaults = PolicyTrainConfig().to_json()  # settings added since the run started take their defaults
    old = {k: v for k, v in {**defaults, **state["config"]}.items() if k not in RESUMABLE_CHANGES}
    new = {k: v for k, v in cfg.to_json().items() if k not in RESUMABLE_CHANGES}
    diff = sorted(k for k in new if old.get(k) != new[k])
    if diff:
        raise LtdError(f"cannot resume {out_dir}: settings changed ({', '.join(diff)}); use the original settings or another --out")
    if state.get("inputs", {}) != inputs:
        raise LtdError(f"cannot resume {out_dir}: it was trained on {state.get('inputs')}, not {inputs}; use the same inputs")
    state["config"] = cfg.to_json()
    return state


@dataclass
class _Run:
    """What the phases of one training run share: settings, specs and the latest policies."""

    cfg: PolicyTrainConfig
    out_dir: Path
    latency: LatencyModel
    make_source: Callable[[], object]
    eval_traces: TraceSet | None
    inputs: dict
    state: dict
    topk: int
    max_depth: int
    sizes: tuple[int, ...]
    specs: dict[str, ObsSpec]
    fixed_depth: int
    fixed_size: int
    latest: dict = field(default_factory=dict)  # kind -> the newest trained LoadedPolicy

    def save_state(self) -> None:
        atomic_write_json(self.out_dir / STATE_FILE, self.state)

    def controller(self) -> LTDController:
        """The latest policies, a fixed rule in place of one not trained yet."""
        return LTDController.from_policies(self.latest.get("depth"), self.latest.get("size"), depth=self.fixed_depth,
                                           size=self.fixed_size, topk=self.topk, costs=self.latency)

    def static(self) -> StaticController:
        return StaticController(depth=self.fixed_depth, topk=self.topk, size=self.fixed_size)

    def evaluate(self) -> dict | None:
        """The latest policies and the fixed static tree against the oracle, in replay on ``eval_traces``."""
        if self.eval_traces is None:
            return None
        return compare(self.eval_traces, self.latency, {"ltd": self.controller, "static": self.static()}, self.sizes)


def _start_run(cfg, out_dir: Path, latency, make_source, eval_traces, inputs: dict, resume: bool) -> _Run:
    """Check the settings, restore or start the state file, and fix the specs from a probe source."""
    cfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(out_dir, cfg, resume, inputs)
    probe = make_source()
    max_size = getattr(probe, "max_size", None)
    if max_size is None and eval_traces is not None:
        max_size = eval_traces.max_size  # live training evaluated on traces: stay within what they recorded
    sizes = tuple(v for v in sizes_up_to(max_size, cfg.sizes) if max_size is None or v <= max_size)
    specs = {k: for_kind(k, probe.topk, probe.max_depth, sizes, min_depth=cfg.min_depth) for k in ("depth", "size")}
    run = _Run(cfg, out_dir, latency, make_source, eval_traces, inputs, state, probe.topk, probe.max_depth, sizes, specs,
               fixed_depth=min(cfg.fixed_depth, probe.max_depth), fixed_size=min(cfg.fixed_size, max(sizes)))
    run.save_state()
    for kind in ("depth", "size"):
        if (out_dir / kind / "policy.json").is_file() and any(p["status"] == "done" and p["kind"] == kind for p in state["phases"]):
            run.latest[kind] = load_policy(out_dir / kind, kind=kind, expect=specs[kind])
    return run


def _phase_model(run: _Run, entry: dict, env, other, ckpt: Path, resume: bool, tb_name: str):
    """The phase's PPO: resumed from its checkpoint, or new (warm-started from a rule when asked)."""
    from stable_baselines3 import PPO  # optional (the rl extra) and slow to import

    cfg, i, kind = run.cfg, entry["index"], entry["kind"]
    total = cfg.iterations * cfg.n_steps
    if resume and ckpt.is_file():
        model = PPO.load(str(ckpt), env=env, device="cpu", tensorboard_log=str(run.out_dir / "tb"))
        log.info("phase %s: resuming at %d of %d steps", tb_name, model.num_timesteps, total)
        return model, False
    model = new_model(
        run.specs[kind], env=env, seed=cfg.seed + i, net_arch=cfg.net_arch, n_steps=cfg.n_steps,
        batch_size=cfg.batch_size, n_epochs=cfg.n_epochs, learning_rate=cfg.learning_rate, gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda, ent_coef=cfg.ent_coef, tensorboard_log=str(run.out_dir / "tb"),
    )
    if cfg.warm_start != "none":
        teacher_env = make_env(kind, run.make_source(), run.specs[kind], other, reward=cfg.reward)
        # the teacher prices each cycle on the table its sequence is timed by (cost families)
        teacher = teacher_for(kind, run.specs[kind], lambda: teacher_env.source.latency, run.fixed_depth)
        obs, actions = collect(teacher_env, teacher, cfg.warm_steps, seed=cfg.seed + i)
        entry["imitation_agreement"] = clone(model, obs, actions, seed=cfg.seed + i)
    return model, True


def _run_phase(run: _Run, entry: dict, resume: bool, progress: bool) -> dict | None:
    """Train one phase's policy against the other kind's latest (or the fixed rule); returns its evaluation."""
    cfg, i, kind = run.cfg, entry["index"], entry["kind"]
    phase_dir = run.out_dir / "phases" / f"{i:02d}-{kind}"
    phase_dir.mkdir(parents=True, exist_ok=True)
    other = run.controller() if ("size" if kind == "depth" else "depth") in run.latest else run.static()
    env = make_env(kind, run.make_source(), run.specs[kind], other, reward=cfg.reward)
    ckpt = phase_dir / CHECKPOINT
    tb_name = f"{i:02d}-{kind}"
    model, reset = _phase_model(run, entry, env, other, ckpt, resume, tb_name)
    entry["status"] = "running"
    run.save_state()

    def on_checkpoint(steps: int) -> None:
        entry["timesteps"] = int(steps)
        run.save_state()

    remaining = cfg.iterations * cfg.n_steps - (0 if reset else model.num_timesteps)
    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=_make_callback(ckpt, cfg.checkpoint_every, on_checkpoint),
                    tb_log_name=tb_name, reset_num_timesteps=reset, progress_bar=progress)
    meta = {"stage": cfg.stage, "phase": i, "env": cfg.env, "timesteps": int(model.num_timesteps),
            "latency_cpu": run.latency.machine.get("cpu_model", ""), **run.inputs}
    save_policy(model, run.specs[kind], phase_dir / "policy", meta)
    save_policy(model, run.specs[kind], run.out_dir / kind, meta)
    run.latest[kind] = load_policy(run.out_dir / kind, kind=kind, expect=run.specs[kind])
    entry["status"] = "done"
    entry["timesteps"] = int(model.num_timesteps)
    report = run.evaluate()
    if report is not None:
        entry["eval"] = {r["name"]: {"tokens_per_second": r["tokens_per_second"], "fraction_of_oracle": r["fraction_of_oracle"]}
                         for r in report["results"]}
        log.info("phase %s: %s", tb_name, entry["eval"])
    run.save_state()
    if ckpt.is_file():
        ckpt.unlink()
    return report


def train_policies(
    cfg: PolicyTrainConfig,
    out_dir: str | Path,
    latency: LatencyModel,
    make_source: Callable[[], object],
    *,
    eval_traces: TraceSet | None = None,
    inputs: dict | None = None,
    resume: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Run the configured phases; returns where the final policies are.

    ``make_source`` builds a cycle source (replay or live) for each phase; with
    ``eval_traces`` every finished phase is evaluated in replay against the oracle, and
    the last phase's evaluation is the run's (evaluated again only when a resumed run had
    no phase left to train).
    """
    out_dir = Path(out_dir)
    run = _start_run(cfg, out_dir, latency, make_source, eval_traces, inputs or {}, resume)
    evaluation = None
    for entry in run.state["phases"]:
        if entry["status"] != "done":
            evaluation = _run_phase(run, entry, resume, progress)
    if evaluation is None:
        evaluation = run.evaluate()
    result = TrainResult(out_dir, out_dir / "depth" if "depth" in run.latest else None,
                         out_dir / "size" if "size" in run.latest else None, run.state["phases"], evaluation)
    atomic_write_json(out_dir / "summary.json", {"phases": run.state["phases"], "evaluation": evaluation,
                                                 "depth_policy": str(result.depth_policy) if result.depth_policy else None,
                                                 "size_policy": str(result.size_policy) if result.size_policy else None})
    return result


def replay_source_factory(traces: TraceSet, latency: LatencyModel, family: list[LatencyModel] | None = None,
                          seed: int = 0) -> Callable[[], object]:
    """Replay sources over ``traces``, timed by ``latency`` or, with a ``family``, by one of
    its cost tables per sequence (a new source draws its own sequence of tables)."""
    counter = itertools.count(seed)
    return lambda: ReplaySource(traces, latency, family, seed=next(counter))


def eval_subset(traces: TraceSet, n: int) -> TraceSet:
    seqs = [s for s in traces.sequences if s.num_positions][:n]
    return TraceSet.from_sequences(seqs, traces.topk, traces.max_depth, traces.max_size)
