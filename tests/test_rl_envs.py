"""Gymnasium environments (replay and live) and a smoke PPO training run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from ltd.control import StaticController
from ltd.control.learned import LTDController
from ltd.errors import LtdError
from ltd.rl.envs import DepthEnv, SizeEnv, make_env
from ltd.control.policy import load_policy
from ltd.rl.sources import LiveSource, ReplaySource, run_controller
from ltd.control.spaces import CONTINUE, STOP, for_kind
from ltd.rl.traces import TraceSet, record
from ltd.rl.train import PolicyTrainConfig, eval_subset, replay_source_factory, train_policies
from test_rl_common import MAX_DEPTH, MAX_NEW, MAX_SIZE, PROMPTS, TOPK, hand_latency, noisy_copy, tiny_engine

torch.set_num_threads(1)

SIZES = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return tiny_engine(tiny_model, noisy_copy(tiny_model))


@pytest.fixture(scope="module")
def traces(tmp_path_factory, engine):
    out = tmp_path_factory.mktemp("traces")
    record(engine, PROMPTS, max_depth=MAX_DEPTH, topk=TOPK, max_new_tokens=MAX_NEW, out_dir=out, max_size=MAX_SIZE, progress=False)
    return TraceSet.load(out)


def replay_source(traces):
    return ReplaySource(traces, hand_latency())


def live_source(engine):
    return LiveSource(engine.backend, engine.drafter, PROMPTS, hand_latency(), topk=TOPK, max_depth=MAX_DEPTH, max_new_tokens=MAX_NEW)


def make(kind, backend, traces, engine):
    source = replay_source(traces) if backend == "replay" else live_source(engine)
    return make_env(kind, source, for_kind(kind, TOPK, MAX_DEPTH, SIZES))


@pytest.mark.parametrize("backend", ["replay", "live"])
@pytest.mark.parametrize("kind", ["depth", "size"])
def test_check_env_passes(kind, backend, traces, engine):
    env = make(kind, backend, traces, engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium's checker warnings count as failures
        check_env(env)


@pytest.mark.parametrize("kind", ["depth", "size"])
def test_replay_and_live_have_identical_spaces_and_walks(kind, traces, engine):
    """Same spaces; driven with the same actions from the same prompt, both backends see the
    same observations and accept the same tokens (only the time differs)."""
    replay, live = make(kind, "replay", traces, engine), make(kind, "live", traces, engine)
    assert replay.observation_space == live.observation_space
    assert replay.action_space == live.action_space
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        o_r, _ = replay.reset(seed=seed)
        o_l, _ = live.reset(seed=seed)
        for _ in range(25):
            assert replay.source.position == live.source.position
            np.testing.assert_allclose(o_r, o_l, atol=1e-5)
            action = int(rng.integers(replay.action_space.n))
            o_r, r_r, t_r, _, info_r = replay.step(action)
            o_l, r_l, t_l, _, info_l = live.step(action)
            assert t_r == t_l
            if t_r:
                c_r, c_l = info_r["cycle"], info_l["cycle"]
                assert (c_r["depth"], c_r["size"], c_r["accepted"], c_r["tokens"]) == (c_l["depth"], c_l["size"], c_l["accepted"], c_l["tokens"])
                assert r_r > 0 and r_l > 0
                o_r, _ = replay.reset()
                o_l, _ = live.reset()


def test_depth_env_cycle_mechanics_and_reward(traces):
    lat = hand_latency()
    env = DepthEnv(ReplaySource(traces, lat), for_kind("depth", TOPK, MAX_DEPTH, SIZES),
                   size_controller=StaticController(depth=MAX_DEPTH, topk=TOPK, size=4))
    obs, info = env.reset(seed=3)
    p0 = env.source.position
    assert obs[TOPK * TOPK] == pytest.approx(1 / MAX_DEPTH)  # one step drafted
    assert (obs[:TOPK] > 0).all() and (obs[TOPK:TOPK * TOPK] == 0).all()  # k candidate probabilities after step 1, padding after
    obs, r, term, _, _ = env.step(CONTINUE)
    assert not term and r == 0.0 and obs[TOPK * TOPK] == pytest.approx(2 / MAX_DEPTH)
    obs, r, term, _, info = env.step(STOP)
    cyc = info["cycle"]
    assert term and cyc["depth"] == 2 and cyc["size"] == 4
    seq = env.source.traces.sequences[[s.key for s in traces.sequences].index(env.source.sequence_key)]
    assert cyc["accepted"] == seq.accepted(p0, 2, 4)
    ctx = len(seq.prompt) + p0
    expected_seconds = lat.cycle_seconds(2, 4, ctx, depth_policy_calls=2)
    assert cyc["seconds"] == pytest.approx(expected_seconds)
    assert r == pytest.approx(cyc["tokens"] / expected_seconds * lat.ar_seconds(ctx))
    env.reset()
    assert env.source.position == p0 + cyc["accepted"] + 1  # the walk continues
    for _ in range(MAX_DEPTH):  # CONTINUE until the depth limit ends the cycle
        _, _, term, _, info = env.step(CONTINUE)
        if term:
            break
    assert term and info["cycle"]["depth"] == MAX_DEPTH


def test_env_refuses_mismatched_spec_and_sizes(traces):
    with pytest.raises(LtdError, match="does not match the source"):
        SizeEnv(replay_source(traces), for_kind("size", TOPK + 1, MAX_DEPTH, SIZES))
    with pytest.raises(LtdError, match="max-size"):
        SizeEnv(replay_source(traces), for_kind("size", TOPK, MAX_DEPTH, (1, 16)))
    lat = hand_latency(topk=TOPK + 1)
    with pytest.raises(LtdError, match="re-run ltd profile --topk"):
        ReplaySource(traces, lat)


@pytest.mark.slow  # PPO phases and a resume: the full suite runs it, make test-fast does not
def test_smoke_ppo_coadaptive_training_and_resume(tmp_path, traces):
    """A few hundred PPO steps per phase (size, depth, size) on the replay env: policies,
    checkpoints state, TensorBoard logs and an evaluation against the oracle are written."""
    lat = hand_latency()
    cfg = PolicyTrainConfig(stage="both", rounds=1, iterations=2, n_steps=128, batch_size=64, n_epochs=2, sizes=SIZES,
                            checkpoint_every=1, eval_sequences=2)
    out = tmp_path / "run"
    result = train_policies(cfg, out, lat, replay_source_factory(traces, lat), eval_traces=eval_subset(traces, 2),
                            inputs={"traces": "t"})
    assert [p["kind"] for p in result.phases] == ["size", "depth", "size"]
    assert all(p["status"] == "done" and p["timesteps"] == 256 for p in result.phases)
    for kind in ("depth", "size"):
        pol = load_policy(out / kind, kind=kind)
        assert pol.spec.topk == TOPK and pol.spec.max_depth == MAX_DEPTH
    assert (out / "phases" / "02-size" / "policy" / "model.zip").is_file()
    assert list((out / "tb").glob("*/events.out.tfevents.*"))
    rows = {r["name"]: r for r in result.evaluation["results"]}
    assert 0 < rows["ltd"]["fraction_of_oracle"] <= 1.0 + 1e-9
    assert 0 < rows["static"]["fraction_of_oracle"] <= 1.0 + 1e-9
    ctrl = LTDController(result.depth_policy, result.size_policy, costs=hand_latency())
    assert ctrl.topk == TOPK
    # an existing run is not overwritten; resuming a finished run trains nothing more
    with pytest.raises(LtdError, match="--resume"):
        train_policies(cfg, out, lat, replay_source_factory(traces, lat))
    again = train_policies(cfg, out, lat, replay_source_factory(traces, lat), inputs={"traces": "t"}, resume=True)
    assert [p["timesteps"] for p in again.phases] == [256, 256, 256]
    with pytest.raises(LtdError, match="settings changed"):
        train_policies(PolicyTrainConfig(stage="size", iterations=2, n_steps=128, batch_size=64, sizes=SIZES), out, lat,
                       replay_source_factory(traces, lat), inputs={"traces": "t"}, resume=True)
    # a run saved before a setting existed resumes with that setting at its default
    import json

    state = json.loads((out / "train_state.json").read_text())
    del state["config"]["warm_start"], state["config"]["warm_steps"]
    (out / "train_state.json").write_text(json.dumps(state))
    assert [p["timesteps"] for p in train_policies(cfg, out, lat, replay_source_factory(traces, lat), inputs={"traces": "t"},
                                                   resume=True).phases] == [256, 256, 256]


class _Interrupted(ReplaySource):
    """A replay source that is interrupted (Ctrl-C) after a number of cycles."""

    budget = 0

    def finish(self, size):
        type(self).budget -= 1
        if type(self).budget < 0:
            raise KeyboardInterrupt
        return super().finish(size)


def test_interrupted_phase_resumes_from_its_checkpoint(tmp_path, traces):
    lat = hand_latency()
    cfg = PolicyTrainConfig(stage="size", iterations=4, n_steps=64, batch_size=32, n_epochs=1, sizes=SIZES, checkpoint_every=1)
    out = tmp_path / "run"
    _Interrupted.budget = 150  # size episodes are one cycle: interrupted during iteration 3
    with pytest.raises(KeyboardInterrupt):
        train_policies(cfg, out, lat, lambda: _Interrupted(traces, lat))
    state = __import__("json").loads((out / "train_state.json").read_text())
    assert state["phases"][0]["status"] == "running" and state["phases"][0]["timesteps"] == 128
    assert (out / "phases" / "00-size" / "checkpoint.zip").is_file()
    result = train_policies(cfg, out, lat, replay_source_factory(traces, lat), resume=True)
    assert result.phases[0]["status"] == "done" and result.phases[0]["timesteps"] == 256
    assert not (out / "phases" / "00-size" / "checkpoint.zip").exists()
    assert load_policy(out / "size", kind="size").meta["trained"]["timesteps"] == 256


def test_live_throughput_matches_replay_in_tokens(traces, engine):
    """The same controller on the same prompts: identical cycles live and in replay (the
    time differs: measured vs modelled), which is what live validation compares."""
    from ltd.rl.oracle import source_throughput

    ctrl = StaticController(depth=3, topk=TOPK, size=6)
    replay = source_throughput(replay_source(traces), ctrl, "replay")
    live = source_throughput(live_source(engine), ctrl, "live")
    assert [a for s in replay.schedules for a in s.actions] == [a for s in live.schedules for a in s.actions]
    assert replay.tokens == live.tokens == len(PROMPTS) * (MAX_NEW - 1)
    assert live.seconds > 0 and replay.seconds > 0


def test_depth_env_with_min_depth_zero_can_skip_drafting(traces):
    """min_depth 0: the first decision comes before any draft; STOP decodes a plain token."""
    lat = hand_latency()
    spec = for_kind("depth", TOPK, MAX_DEPTH, SIZES, min_depth=0)
    env = DepthEnv(ReplaySource(traces, lat), spec)
    obs, _ = env.reset(seed=0)
    kk = TOPK * TOPK
    assert (obs[:kk] == 0).all() and obs[kk] == 0.0
    p0 = env.source.position
    _, reward, term, _, info = env.step(STOP)
    assert term and info["cycle"]["depth"] == 0 and info["cycle"]["tokens"] == 1
    ctx = env.source.committed_length - 1
    assert info["cycle"]["seconds"] == pytest.approx(lat.ar_seconds(ctx) + lat.depth_policy_seconds)
    env.reset()
    assert env.source.position == p0 + 1
    # a controller built on such a policy asks it before drafting too
    from ltd.rl.policy import untrained_policy

    ctrl = LTDController.from_policies(untrained_policy(spec), None, size=4, costs=hand_latency())
    assert ctrl.asks_depth_policy(0)
    assert not LTDController.from_policies(untrained_policy(for_kind("depth", TOPK, MAX_DEPTH, SIZES)), None,
                                          costs=hand_latency()).asks_depth_policy(0)


# -- history features and the "verify nothing" size --------------------------------------


def test_history_features_follow_cycles():
    from ltd.control.spaces import SINCE_DRAFT_SCALE, History

    h = History()
    assert h.features().tolist() == [0.0, 0.0, 1.0]  # nothing drafted yet: "long ago"
    h.update(depth=4, accepted=2)
    assert h.features().tolist() == [0.5, 0.5, 0.0]
    h.update(depth=0, accepted=0)  # a plain decoding step only ages the history
    h.update(depth=2, accepted=1, size=0)  # drafted but verified nothing: same
    assert h.features()[:2].tolist() == [0.5, 0.5] and h.features()[2] == pytest.approx(2 / SINCE_DRAFT_SCALE)
    h.update(depth=2, accepted=2)
    last, mean, since = h.features().tolist()
    assert last == 1.0 and 0.5 < mean < 1.0 and since == 0.0
    h.reset()
    assert h.features().tolist() == [0.0, 0.0, 1.0]


def test_censored_acceptance_estimate_on_a_hand_made_sequence():
    """A fully accepted draft is a lower bound (no rejection seen), a short one shows one."""
    from ltd.control.spaces import HISTORY_EMA, RUN_SCALE, History

    h = History()
    assert h.acceptance == 0.0 and h.features(4).tolist()[3:] == [0.0, 0.0]
    h.update(depth=4, accepted=2, size=8)  # stopped short: 2 accepted, 1 rejected
    assert h.acceptance == pytest.approx(2 / 3)
    h.update(depth=6, accepted=6, size=6)  # all it could: 6 more accepted, no rejection
    w = 1 - HISTORY_EMA
    S, F = 2 * w + 6, w
    assert h.acceptance == pytest.approx(S / (S + F)) and h.acceptance > 2 / 3
    h.update(depth=8, accepted=3, size=3)  # the size capped the run at 3: censored too
    S, F = w * S + 3, w * F
    assert h.acceptance == pytest.approx(S / (S + F))
    h.update(depth=5, accepted=0, size=5)  # rejected at once
    S, F = w * S, w * F + 1
    assert h.features(4).tolist()[3] == pytest.approx(S / (S + F)) and h.features(4).tolist()[4] == 0.0
    h.update(depth=32, accepted=20, size=40)  # stopped short of 32: one rejection
    S, F = w * S + 20, w * F + 1
    assert h.acceptance == pytest.approx(S / (S + F)) and h.features(4)[4] == pytest.approx(20 / RUN_SCALE)
    assert len(h.features()) == 3 and len(h.features(4)) == 5  # version 3 policies keep their layout
    h.update(depth=0, accepted=0)  # a plain step leaves the estimate alone
    assert h.acceptance == pytest.approx(S / (S + F))
    h.reset()
    assert h.acceptance == 0.0 and h.last_run == 0


def test_drafter_signals_are_scaled_into_the_observation():
    from ltd.control.spaces import COST_COUNT, ObsSpec, cost_features, depth_observation, signal_features

    assert signal_features(None).tolist() == [0.0] * 5
    f = signal_features([32, 31, 0.9, 64, 16])
    assert f.tolist() == pytest.approx([0.5, 5 / 6, 0.9, 1.0, 0.5])
    spec = for_kind("depth", TOPK, MAX_DEPTH, SIZES)
    assert spec.version == 4 and [n for n, _ in spec.fields()][-3:] == ["signals", "costs", "history"]
    obs = depth_observation(spec, 1, torch.tensor([-0.1, -1.0]), 100, None, [32, 31, 0.9, 64, 16], cost_features(hand_latency(), 100))
    assert obs.size == spec.dim and spec.field(obs, "signals").tolist() == pytest.approx(f.tolist())
    old = ObsSpec.from_json({**spec.to_json(), "version": 3, "fields": []})  # a shipped version-3 policy still reads
    assert [n for n, _ in old.fields()][-1] == "history" and old.dim == spec.dim - 7 - COST_COUNT
    assert depth_observation(old, 1, torch.tensor([-0.1]), 100).size == old.dim  # and needs no cost table
    with pytest.raises(LtdError, match="observation version 9 is not one of"):
        ObsSpec.from_json({**spec.to_json(), "version": 9, "fields": []})


def test_size_zero_is_a_plain_step_in_replay_and_live(traces, engine):
    spec = for_kind("size", TOPK, MAX_DEPTH, (0, 1, 2))
    for source in (replay_source(traces), live_source(engine)):
        env = SizeEnv(source, spec, depth_controller=StaticController(depth=2, topk=TOPK, size=1))
        env.reset(seed=0)
        _, reward, done, _, info = env.step(0)  # action 0 = verify none of the drafted nodes
        assert done and info["cycle"]["size"] == 0 and info["cycle"]["accepted"] == 0 and info["cycle"]["tokens"] == 1
        assert info["cycle"]["depth"] == 2  # the drafting happened and was paid for


def test_controller_history_matches_the_environment(traces):
    """The history an LTDController builds from observe_result equals the env's, cycle by cycle."""
    from ltd.rl.policy import untrained_policy
    from ltd.control.spaces import History

    spec_d = for_kind("depth", TOPK, MAX_DEPTH, SIZES, min_depth=0)
    spec_s = for_kind("size", TOPK, MAX_DEPTH, SIZES, min_depth=0)
    ctrl = LTDController.from_policies(untrained_policy(spec_d, seed=1), untrained_policy(spec_s, seed=2), costs=hand_latency())
    env = DepthEnv(replay_source(traces), spec_d, size_controller=StaticController(depth=MAX_DEPTH, topk=TOPK, size=2))
    env.reset(seed=0)
    shadow = History()
    for _ in range(12):
        _, _, done, _, info = env.step(CONTINUE)
        while not done:
            _, _, done, _, info = env.step(CONTINUE)
        c = info["cycle"]
        shadow.update(c["depth"], c["accepted"], c["size"])
        ctrl.observe_result(env.last_outcome.as_cycle_result(1))
        assert ctrl.history.features().tolist() == env.history.features().tolist() == shadow.features().tolist()
        env.reset()
        if env.source.position == 0:  # the env moved on to a new sequence, and so would the engine
            ctrl.reset()
            shadow.reset()


def test_gain_reward_is_tokens_beyond_plain_decoding(traces):
    src = replay_source(traces)
    spec = for_kind("depth", TOPK, MAX_DEPTH, SIZES, min_depth=0)
    env = DepthEnv(src, spec, reward="gain")
    env.reset(seed=0)
    _, reward, done, _, info = env.step(STOP)  # no draft: one plain step plus the policy call
    c = info["cycle"]
    unit = src.latency.ar_seconds(env.last_outcome.context_length - 1)
    assert done and c["depth"] == 0 and c["tokens"] == 1
    assert reward == pytest.approx(1 - c["seconds"] / unit) and reward < 0  # slower than plain by the policy call
    with pytest.raises(LtdError, match="reward"):
        DepthEnv(src, spec, reward="speed")


def test_expected_value_teacher_reads_the_size_observation():
    """The rule verifies the V with the most expected tokens per modelled second."""
    from ltd.rl.imitation import expected_value_teacher
    from ltd.control.spaces import size_observation

    lat = hand_latency()  # verify = 10 ms + 0.5 ms per token: a node is worth verifying above ~0.05 probability
    spec = for_kind("size", TOPK, MAX_DEPTH, (0, 1, 2, 4, 8))
    teacher = expected_value_teacher(spec, lat)
    depths = torch.tensor([1, 1, 2, 2, 3, 3])
    from ltd.control.spaces import cost_features

    costs = cost_features(lat, 64)
    sure = size_observation(spec, torch.log(torch.tensor([0.9, 0.2, 0.8, 0.1, 0.7, 0.05])), depths, 3, 64, costs=costs)
    weak = size_observation(spec, torch.log(torch.tensor([0.02, 0.01, 0.01, 0.005, 0.004, 0.001])), depths, 3, 64, costs=costs)

    def rate(v, probs):  # by hand: 1 + the v best probabilities, over the modelled cycle
        return (1 + sum(sorted(probs, reverse=True)[:v])) / lat.cycle_seconds(3, v, 64)

    probs = [0.9, 0.2, 0.8, 0.1, 0.7, 0.05]
    best = max((0, 1, 2, 4, 8), key=lambda v: rate(min(v, 6), probs))
    assert spec.sizes[teacher(sure)] == best and best >= 4
    assert spec.sizes[teacher(weak)] == 0  # nothing worth its verification: a plain step


@pytest.mark.slow  # imitation then PPO: the full suite runs it, make test-fast does not
def test_warm_start_clones_the_rule_before_ppo(tmp_path, traces):
    """With --warm-start expected-value each new phase starts as the rule: the cloned size
    policy agrees with it on the decisions it was fitted on, and is saved like any other."""
    lat = hand_latency()
    from ltd.rl.imitation import collect, fixed_depth_teacher

    cfg = PolicyTrainConfig(stage="both", rounds=1, iterations=1, n_steps=64, batch_size=64, n_epochs=1, sizes=SIZES,
                            fixed_depth=2, warm_start="expected-value", warm_steps=512, learning_rate=1e-6)
    result = train_policies(cfg, tmp_path / "run", lat, replay_source_factory(traces, lat), inputs={"traces": "t"})
    assert all(p["imitation_agreement"] >= 0.85 for p in result.phases)  # a fresh policy agrees by chance only
    # the saved depth policy continues exactly until the fixed depth on fresh decisions
    depth_policy = load_policy(tmp_path / "run" / "depth", kind="depth")
    teacher = fixed_depth_teacher(depth_policy.spec, cfg.fixed_depth)
    env = make_env("depth", replay_source(traces), depth_policy.spec, StaticController(cfg.fixed_depth, TOPK, 4))
    obs, actions = collect(env, teacher, 200, seed=1)
    assert set(actions.tolist()) == {STOP, CONTINUE}
    # a clone, not a copy: on fresh decisions (histories it was not fitted on) it may miss a few
    agree = np.mean([depth_policy.act(o) == a for o, a in zip(obs, actions.tolist())])
    assert agree >= 0.97, agree
    with pytest.raises(LtdError, match="warm-start"):
        PolicyTrainConfig(warm_start="guess").validate()


def test_observation_fields_are_located_by_name():
    spec = for_kind("size", TOPK, MAX_DEPTH, SIZES)
    obs = np.arange(spec.dim, dtype=np.float32)
    n = spec.size_nodes
    assert spec.field(obs, "tree_scores").tolist() == list(range(n))
    assert spec.field(obs, "depth").tolist() == [2 * n] and spec.field(obs, "context").tolist() == [2 * n + 1]
    with pytest.raises(KeyError, match="step"):
        spec.field(obs, "step")


# -- cost-conditioned policies -------------------------------------------------------------


def test_cost_features_describe_the_curve_not_the_speed():
    from ltd.control.spaces import COST_COUNT, CostView, cost_features

    flat, steep = hand_latency(per_token=0.1e-3), hand_latency(per_token=2e-3)
    f_flat, f_steep = cost_features(flat, 100), cost_features(steep, 100)
    assert f_flat.shape == (COST_COUNT,) and ((0 <= f_flat) & (f_flat <= 1)).all()
    assert (f_steep[:7] > f_flat[:7]).all() and f_steep[-2:].tolist() == pytest.approx(f_flat[-2:].tolist(), abs=0.05)
    # twice as slow a machine with the same shape: the same features
    slow = hand_latency(step=2e-3, verify_base=20e-3, per_token=1e-3, overhead=0.4e-3)
    assert cost_features(slow, 100).tolist() == pytest.approx(cost_features(hand_latency(), 100).tolist(), abs=1e-6)
    view = CostView(steep)
    assert view.at(10) is view.at(40) and view.at(10).tolist() == pytest.approx(cost_features(steep, 32).tolist())


def test_cost_conditioned_policy_needs_and_reads_the_cost_table(traces):
    from ltd.rl.policy import untrained_policy

    spec_d, spec_s = for_kind("depth", TOPK, MAX_DEPTH, SIZES), for_kind("size", TOPK, MAX_DEPTH, SIZES)
    assert spec_d.needs_costs and "costs" in dict(spec_d.fields())
    dp, sp = untrained_policy(spec_d, seed=1), untrained_policy(spec_s, seed=2)
    with pytest.raises(LtdError, match="observe the machine's cost table") as info:
        LTDController.from_policies(dp, sp)
    assert "\n" not in str(info.value)
    ctrl = LTDController.from_policies(dp, sp, costs=hand_latency())
    src = replay_source(traces)
    outcomes = run_controller(src, ctrl, 0, max_cycles=6)
    assert len(outcomes) == 6
    # the observation carries the table: another table, another observation
    env = DepthEnv(replay_source(traces), spec_d)
    env.reset(seed=0)
    a = spec_d.field(env._obs(), "costs").copy()
    env.source.latency = hand_latency(per_token=3e-3)
    assert not np.allclose(spec_d.field(env._obs(), "costs"), a)


def test_cost_family_varies_the_curve_and_replay_draws_from_it(traces):
    from ltd.control.spaces import cost_features
    from ltd.rl.latency import adopt, cost_family

    base = hand_latency()
    other = hand_latency(per_token=3e-3, verify_base=30e-3)
    family = cost_family(base, variants=6, others=[other], seed=0)
    assert len(family) == 8 and family[0] is base
    assert adopt(other, base, "x").verify_time(1, 8) == pytest.approx(base.verify_time(1, 8))  # on base's plain step
    slopes = {round(float(cost_features(m, 8)[4]), 3) for m in family}
    assert len(slopes) >= 6  # the curves differ
    for m in family[2:]:
        assert m.ar_seconds(8) == pytest.approx(base.ar_seconds(8))  # same plain step, other marginal costs
    src = ReplaySource(traces, base, family, seed=0)
    seen = set()
    for i in range(24):
        src.start(i)
        seen.add(id(src.latency))
    assert len(seen) >= 5
    with pytest.raises(LtdError, match="topk"):
        ReplaySource(traces, base, [hand_latency(topk=TOPK + 1)])
