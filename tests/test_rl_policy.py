"""Policy directories (save, load, refusal of mismatches) and the controllers in the cycle."""

from __future__ import annotations

import math

import json

import numpy as np
import pytest
import torch

from conftest import assert_same_tokens, hf_greedy, run_decode
from ltd.backends.hf import HFBackend
from ltd.control import DraftStepState
from ltd.control.learned import HeuristicController, LTDController
from ltd.cycle import CycleResult
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.lm import LMDrafter
from ltd.errors import LtdError
from ltd.control.policy import load_policy
from ltd.rl.policy import new_model, save_policy, untrained_policy
from ltd.rl.sources import LiveSource, run_controller
from ltd.control.spaces import depth_observation, for_kind, size_observation
from ltd.tree import Tree
from test_rl_common import PROMPTS, hand_latency, noisy_copy

torch.set_num_threads(1)

TOPK, MAX_DEPTH, SIZES = 3, 5, (1, 2, 4, 8, 16)
MAX_NEW = 32


@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    dirs = {}
    for kind, seed in (("depth", 1), ("size", 2)):
        spec = for_kind(kind, TOPK, MAX_DEPTH, SIZES)
        dirs[kind] = save_policy(new_model(spec, seed=seed), spec, root / kind, {"note": "untrained"})
    return dirs


def test_policy_round_trip_matches_sb3_predict(policy_dirs):
    from stable_baselines3 import PPO

    for kind, d in policy_dirs.items():
        meta = json.loads((d / "policy.json").read_text())
        assert meta["kind"] == kind and meta["version"] == 1 and meta["observation"]["topk"] == TOPK
        assert [f["name"] for f in meta["observation"]["fields"]][-4:] == ["context", "signals", "costs", "history"]
        pol = load_policy(d, kind=kind)
        model = PPO.load(str(d / "model.zip"), device="cpu")
        rng = np.random.default_rng(0)
        low, high = pol.spec.bounds()
        for _ in range(20):
            obs = rng.uniform(low, high).astype(np.float32)
            want, _ = model.predict(obs, deterministic=True)
            assert pol.act(obs) == int(want)


def test_mismatched_policies_are_refused_with_one_line(policy_dirs, tmp_path):
    def refuse(match, fn):
        with pytest.raises(LtdError, match=match) as info:
            fn()
        assert "\n" not in str(info.value)

    refuse("a size policy is needed", lambda: load_policy(policy_dirs["depth"], kind="size"))
    refuse(r"topk 3 \(expected 4\)", lambda: load_policy(policy_dirs["depth"], expect=for_kind("depth", 4, MAX_DEPTH)))
    refuse("max depth", lambda: load_policy(policy_dirs["depth"], expect=for_kind("depth", TOPK, 8)))
    refuse("size set", lambda: load_policy(policy_dirs["size"], expect=for_kind("size", TOPK, MAX_DEPTH, (1, 2, 4))))
    refuse("a size policy is needed", lambda: LTDController(policy_dirs["depth"], policy_dirs["depth"]))
    # a depth and a size policy trained on different trees
    other = tmp_path / "other-size"
    spec = for_kind("size", TOPK + 1, MAX_DEPTH, SIZES)
    save_policy(new_model(spec), spec, other)
    refuse("trained on different trees", lambda: LTDController(policy_dirs["depth"], other))
    # version bumps, corrupted specs and unfinished saves
    for name, edit, match in (
        ("version", lambda m: m.update(version=99), "version 99"),
        ("obsversion", lambda m: m["observation"].update(version=7), "observation version 7"),
        ("fields", lambda m: m["observation"]["fields"].pop(), "retrain the policy"),
        # a cost table of another format (another set of cost points) than this ltd builds
        ("costs", lambda m: [f.update(size=7) for f in m["observation"]["fields"] if f["name"] == "costs"],
         "observation layout"),
    ):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "model.zip").write_bytes((policy_dirs["size"] / "model.zip").read_bytes())
        meta = json.loads((policy_dirs["size"] / "policy.json").read_text())
        edit(meta)
        (bad / "policy.json").write_text(json.dumps(meta))
        refuse(match, lambda: load_policy(bad))
    refuse("not a finished LTD policy", lambda: load_policy(tmp_path))
    refuse("does not exist", lambda: load_policy(tmp_path / "nowhere"))


def test_observations_fit_their_spaces():
    spec_d = for_kind("depth", TOPK, MAX_DEPTH, SIZES)
    spec_s = for_kind("size", TOPK, MAX_DEPTH, SIZES)
    from ltd.control.spaces import cost_features

    costs = cost_features(hand_latency(), 100)
    obs = depth_observation(spec_d, 2, torch.tensor([-0.5, -100.0, float("-inf"), -3.0]), 10_000, costs=costs)
    assert obs in spec_d.observation_space()
    # probabilities, largest first; -100 is clipped at -20; -inf and padding are 0
    assert obs[:4].tolist() == pytest.approx([math.exp(-0.5), math.exp(-3.0), math.exp(-20.0), 0.0], abs=1e-7)
    tree = Tree.root(1)
    tree.add(torch.tensor([5, 6]), torch.tensor([0, 0]), torch.tensor([-1.0, -0.5]))
    tree.add(torch.tensor([7]), torch.tensor([2]), torch.tensor([-0.5]))
    obs = size_observation(spec_s, tree.scores[1:], tree.depths[1:], tree.max_depth, 100, costs=costs)
    assert obs in spec_s.observation_space() and spec_s.field(obs, "costs").tolist() == pytest.approx(costs.tolist())
    n = spec_s.size_nodes
    # select's ranking: -0.5 (depth 1) before -0.5 (depth 2) before -1.0
    assert obs[:3].tolist() == pytest.approx([math.exp(-0.5), math.exp(-0.5), math.exp(-1.0)]) and obs[3] == 0
    assert obs[n : n + 4].tolist() == pytest.approx([1 / MAX_DEPTH, 2 / MAX_DEPTH, 1 / MAX_DEPTH, 0])


@pytest.mark.parametrize("kind", ["lm", "eagle3"])
def test_ltd_controller_in_decode_is_lossless(kind, policy_dirs, tiny_model, tiny_head):
    if kind == "lm":
        drafter = LMDrafter(HFBackend(noisy_copy(tiny_model)))
    else:
        drafter = Eagle3Drafter(tiny_head, tiny_model.get_input_embeddings())
    ctrl = LTDController(policy_dirs["depth"], policy_dirs["size"], costs=hand_latency())
    for prompt in PROMPTS:
        tokens, results = run_decode(HFBackend(tiny_model), drafter, ctrl, prompt, MAX_NEW, topk=ctrl.topk)
        assert_same_tokens(tokens, hf_greedy(tiny_model, prompt, MAX_NEW), tiny_model, prompt, f"ltd/{kind}")
        assert all(1 <= r.depth <= MAX_DEPTH and r.size <= max(SIZES) for r in results[1:])


def test_ltd_controller_refuses_another_topk(policy_dirs, tiny_model):
    ctrl = LTDController(policy_dirs["depth"], policy_dirs["size"], costs=hand_latency())
    drafter = LMDrafter(HFBackend(tiny_model))
    with pytest.raises(LtdError, match="decode with --topk 3"):
        run_decode(HFBackend(tiny_model), drafter, ctrl, PROMPTS[0], 8, topk=4)


def test_ltd_controller_with_one_policy_falls_back_to_fixed_rule(policy_dirs):
    ctrl = LTDController(None, policy_dirs["size"], depth=2, size=4, costs=hand_latency())
    tree = Tree.root(1)
    tree.add(torch.arange(3), torch.zeros(3, dtype=torch.long), torch.tensor([-0.1, -0.2, -0.3]))
    st = DraftStepState(1, tree.scores[1:], 10, tree, TOPK)
    assert ctrl.continue_drafting(st) and not ctrl.continue_drafting(DraftStepState(2, tree.scores[1:], 10, tree, TOPK))
    assert 1 <= ctrl.choose_size(st) <= 3
    pol = untrained_policy(for_kind("depth", TOPK, MAX_DEPTH, SIZES))
    only_depth = LTDController.from_policies(pol, None, size=2, costs=hand_latency())
    assert only_depth.choose_size(st) == 2 and only_depth.continue_drafting(DraftStepState(0, torch.empty(0), 10, Tree.root(1), TOPK))


def test_heuristic_rule():
    h = HeuristicController(depth=3, topk=2, size=8, max_depth=6)

    def result(depth, accepted):
        return CycleResult(new_tokens=[0] * (accepted + 1), cycle=1, depth=depth, num_accepted=accepted)

    h.observe_result(result(3, 3))
    assert h.current == 5
    h.observe_result(result(5, 5))
    assert h.current == 6  # capped
    h.observe_result(result(6, 2))
    assert h.current == 5
    for _ in range(10):
        h.observe_result(result(h.current, 0))
    assert h.current == 1
    h.observe_result(result(0, 0))  # plain decoding step: no information
    assert h.current == 1
    h.reset()
    assert h.current == 3
    with pytest.raises(LtdError):
        HeuristicController(depth=7, max_depth=6)


def test_heuristic_with_feedback_is_lossless_and_adapts(tiny_model):
    """Driven with feedback (as the cycle will once it calls observe_result): the same greedy
    text, and the depth follows the acceptance."""
    for drafter_model, expect_deep in ((tiny_model, True), (noisy_copy(tiny_model, scale=0.5), False)):
        h = HeuristicController(depth=3, topk=2, size=64, max_depth=8)
        src = LiveSource(HFBackend(tiny_model), LMDrafter(HFBackend(drafter_model)), PROMPTS, hand_latency(topk=2),
                         topk=2, max_depth=8, max_new_tokens=MAX_NEW)
        outcomes = run_controller(src, h, 1)
        tokens = src.state.tokens[len(PROMPTS[1]) :]
        assert len(tokens) >= MAX_NEW and sum(o.tokens for o in outcomes) == MAX_NEW - 1
        ref = hf_greedy(tiny_model, PROMPTS[1], MAX_NEW)
        assert_same_tokens(tokens[:MAX_NEW], ref, tiny_model, PROMPTS[1], "heuristic")
        depths = [o.depth for o in outcomes]
        if expect_deep:  # the target drafting for itself: every level accepted, depth grows to the cap
            assert depths[:4] == [3, 5, 7, 8]
        else:
            assert min(depths) < 3


def test_heuristic_in_decode_is_lossless_and_gets_feedback(tiny_model):
    """ltd.cycle.run_cycle calls observe_result: drafting for itself, the target accepts every
    level, so the depth grows by 2 per cycle up to the cap."""
    h = HeuristicController(depth=2, topk=2, size=64, max_depth=7)
    tokens, results = run_decode(HFBackend(tiny_model), LMDrafter(HFBackend(tiny_model)), h, PROMPTS[0], MAX_NEW, topk=2)
    assert_same_tokens(tokens, hf_greedy(tiny_model, PROMPTS[0], MAX_NEW), tiny_model, PROMPTS[0], "heuristic")
    assert [r.depth for r in results[1:5]] == [2, 4, 6, 7]
