"""The hf backend's measured matmul plan: same products, same greedy text, cached per machine."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_tokens, hf_greedy, make_tiny_head, make_tiny_llama, run_decode
from ltd.backends.hf import HFBackend
from ltd.backends.hf_kernels import (
    GQA_ENV,
    MAX_PLANNED_ROWS,
    MEASURED_ROWS,
    MIN_GAIN,
    PLAN_VERSION,
    KernelPlan,
    KernelState,
    PlannedLinear,
    beats_stock,
    decide,
    install,
    installed_state,
    plan_from_timer,
    plan_key,
    plan_path,
    resolve_plan,
)
from ltd.control import StaticController
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.errors import LtdError

ALL_ROWS = KernelPlan.wxt(range(1, MAX_PLANNED_ROWS + 1))
# every count padded with zero rows: odd counts one row more, on either formulation
PADDED = KernelPlan({r: ("wxt" if r % 4 else "linear", r + r % 2) for r in range(1, MAX_PLANNED_ROWS)})


@pytest.mark.parametrize("bias", [False, True])
def test_planned_linear_computes_the_same_product(bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=bias)
    state = KernelState()
    layer = PlannedLinear(base, state)
    assert layer.weight is base.weight and layer.bias is base.bias
    for rows in (1, 2, 3, 5, 9):
        x = torch.randn(1, rows, 24)
        ref = F.linear(x, base.weight, base.bias)
        assert torch.equal(layer(x), ref)  # outside a planned forward: F.linear itself
        for plan in (ALL_ROWS, PADDED):
            with state.use(plan):
                out = layer(x)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_wxt_input_is_made_row_major():
    """A transposed input (the previous layer's (W @ x.T).T) gives the same product."""
    torch.manual_seed(1)
    base = torch.nn.Linear(24, 40, bias=False)
    state = KernelState()
    layer = PlannedLinear(base, state)
    x = torch.randn(24, 3).t().unsqueeze(0)  # [1, 3, 24], not contiguous
    assert not x.is_contiguous()
    with state.use(ALL_ROWS):
        out = layer(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, base.weight), rtol=1e-5, atol=1e-5)


def test_plan_applies_only_to_its_row_counts():
    state = KernelState()
    with state.use(KernelPlan({1: ("wxt", 2), 2: ("wxt", 2), 3: ("linear", 4)})):
        assert [state.route(r) for r in (1, 2, 3, 4)] == [("wxt", 2), ("wxt", 2), ("linear", 4), ("linear", 4)]
        assert [state.route(r)[0] == "wxt" for r in (1, 2, 3, 4)] == [True, True, False, False]
    assert state.route(2) == ("linear", 2)  # the plan ends with the forward
    with state.use(KernelPlan.wxt(range(1, MAX_PLANNED_ROWS + 2))):
        assert state.route(MAX_PLANNED_ROWS) == ("wxt", MAX_PLANNED_ROWS)
        assert state.route(MAX_PLANNED_ROWS + 1) == ("linear", MAX_PLANNED_ROWS + 1)  # prefill: always F.linear


def test_a_forward_the_plan_does_not_route_runs_the_stock_layers():
    """No route for the forward's row counts: the layers see no plan and call F.linear directly."""
    model = make_tiny_llama(seed=8)
    plan = KernelPlan({1: ("wxt", 2), 3: ("wxt", 3)})
    backend = HFBackend(model, kernels=plan)
    state = installed_state(model)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *_: seen.append(state.plan))
    backend.score([1, 2], [-1, 0])  # 2 rows: not routed
    assert seen[-1] is None
    backend.rollback()
    backend.score([1, 2, 3], [-1, 0, 0])  # 3 rows: routed
    assert seen[-1] is plan
    backend.rollback()
    backend.score([1, 2], [-1, 0], last_only=True)  # the LM head's one row is routed
    assert seen[-1] is plan
    assert state.plan is None  # and the plan ends with the forward
    assert plan.applies(1) and plan.applies(3) and not plan.applies(2) and plan.applies(2, last_only=True)
    assert not KernelPlan().applies(1, last_only=True)


def test_install_keeps_parameters_and_tied_weights():
    model = make_tiny_llama(seed=3)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's are
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = install(model, KernelState())
    assert n == sum(1 for m in model.modules() if isinstance(m, PlannedLinear)) > 0
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert installed_state(model) is not None


def test_decide_takes_clear_wins_padding_and_the_next_measured_count():
    measured = {
        1: {"linear": 57.0, "wxt": 58.0},
        2: {"linear": 56.0, "wxt": 39.0},
        3: {"linear": 66.0, "wxt": 60.0},
        4: {"linear": 49.0, "wxt": 48.0},  # within the noise margin of its own linear
        8: {"linear": 90.0, "wxt": 75.0},
    }
    routes = decide(measured)
    assert routes[1] == ("wxt", 2)  # one row padded to two: 39 against 57
    assert routes[2] == ("wxt", 2)
    assert 4 not in routes  # F.linear on 4 rows stays: wxt is not 3% faster
    assert routes[3] == ("wxt", 4)  # padded to the cheaper count above
    assert routes[5] == ("wxt", 5) and routes[8] == ("wxt", 8)  # unmeasured 5-7 cost as 8
    assert max(routes) == 8  # nothing measured above: beyond it F.linear
    assert decide({}) == {}
    plan = KernelPlan(routes)
    assert KernelPlan.from_json(plan.to_json()).routes == routes
    assert plan.summary() == {"wxt_rows": [1, 2, 3, 5, 6, 7, 8], "padded": {"1": 2, "3": 4}, "timings_ms": {}}


def stock_cost(rows: int) -> float:
    """A fake machine's F.linear forward of ``rows`` nodes (seconds)."""
    return 0.050 + 0.005 * rows


class FakeTimer:
    """Whole-forward times of a fake machine, per (rows, route).

    ``screen`` gives the first pass's unpadded (W @ x.T).T times (others cost 2% more than
    F.linear); ``actual`` gives a route's time when it is run as planned, once the first
    pass has timed that key ``rounds`` times. ``slow`` maps a key to the occurrences of it
    that take 1.5x as long: a slow moment of a shared machine.
    """

    def __init__(self, screen=None, actual=None, scale=1.0, slow=None, rounds=4):
        self.screen, self.actual, self.scale, self.slow, self.rounds = screen or {}, actual or {}, scale, slow or {}, rounds
        self.calls: list[tuple[int, tuple[str, int]]] = []

    def __call__(self, rows, route):
        seen = sum(1 for c in self.calls if c == (rows, route))
        self.calls.append((rows, route))
        mode, padded = route
        if mode == "linear" and padded == rows:
            t = stock_cost(rows)
        elif (rows, route) in self.actual and (padded != rows or seen >= self.rounds):
            t = self.actual[(rows, route)]
        elif padded == rows:
            t = self.screen.get(rows, 1.02 * stock_cost(rows))
        else:  # a padded route nobody described: what its padded count costs
            t = self.screen.get(padded, 1.02 * stock_cost(padded))
        return self.scale * t * (1.5 if seen in self.slow.get((rows, route), ()) else 1.0)


def test_plan_keeps_stock_unless_the_route_is_timed_clearly_faster(caplog):
    fake = FakeTimer(
        # first pass: two rows on (W @ x.T).T look cheap, so one row padded to two is proposed;
        # 3 and 5 rows look 30% and 7% faster
        screen={2: 0.040, 3: 0.70 * stock_cost(3), 5: 0.93 * stock_cost(5)},
        actual={
            (1, ("wxt", 2)): 0.056,  # one row padded to two, timed as it runs: slower than stock
            (5, ("wxt", 5)): 0.97 * stock_cost(5),  # only 3% faster at the second look: noise
        },
    )
    with caplog.at_level("INFO", logger="ltd.backends.hf_kernels"):
        plan = plan_from_timer(fake, budget_seconds=1000.0)
    assert plan.route(1) == ("linear", 1)  # plain decoding stays stock
    assert (1, ("wxt", 2)) in fake.calls  # because the padded route itself was timed
    assert plan.route(2) == ("wxt", 2) and plan.route(3) == ("wxt", 3)  # clear wins are taken
    assert plan.route(5) == ("linear", 5)  # within the margin: stock
    assert set(plan.routes) == {2, 3}
    one = plan.timings["1"]
    assert one["stock"] == pytest.approx(stock_cost(1)) and one["chosen"] == one["stock"]
    assert one["candidate"] == pytest.approx(0.056) and one["candidate_route"] == ["wxt", 2]
    assert plan.timings["3"]["chosen"] == pytest.approx(0.70 * stock_cost(3))
    assert plan.timings["4"] == {"stock": pytest.approx(stock_cost(4)), "chosen": pytest.approx(stock_cost(4))}
    assert plan.summary()["timings_ms"]["3"]["chosen"] == pytest.approx(1e3 * 0.70 * stock_cost(3), abs=0.01)
    assert "1 row: (W @ x.T).T padded to 2 rows 56.0 ms against F.linear 55.0 ms" in caplog.text
    assert KernelPlan.from_json(plan.to_json()).timings == plan.timings


def test_a_padded_route_that_really_is_faster_is_taken():
    fake = FakeTimer(screen={2: 0.040}, actual={(1, ("wxt", 2)): 0.042})
    plan = plan_from_timer(fake, budget_seconds=1000.0)
    assert plan.route(1) == ("wxt", 2)
    assert plan.timings["1"]["chosen"] == pytest.approx(0.042)


def test_a_slow_spell_in_the_first_pass_does_not_make_a_route():
    """(W @ x.T).T is 2% slower everywhere, but F.linear on one row hit a slow moment in two
    of the four first-pass rounds (its occurrences 0-1 are the warm-up and the probe)."""
    fake = FakeTimer(slow={(1, ("linear", 1)): {2, 3}})
    plan = plan_from_timer(fake, budget_seconds=1000.0)
    assert (1, ("wxt", 1)) in fake.calls[-10:]  # the first pass proposed it; the second timed it
    assert plan.routes == {}
    assert all(t["chosen"] == t["stock"] for t in plan.timings.values())


def test_beats_stock_needs_the_margin_in_medians_and_in_pairs():
    stock = [1.0, 1.0, 1.0, 1.0, 1.0]
    assert beats_stock(stock, [0.90] * 5)
    assert not beats_stock(stock, [0.97] * 5)  # within the margin
    assert not beats_stock(stock, [1.10] * 5)  # slower
    # a pair order that flatters the route on a drifting machine: medians alone would pass
    assert not beats_stock([1.0, 1.0, 2.0, 2.0, 2.0], [0.9, 0.9, 1.9, 1.99, 1.99])
    with pytest.raises(ValueError):
        beats_stock([1.0], [])


def test_the_budget_leaves_later_proposals_stock_but_always_checks_the_first():
    # a large model: one forward ~5 s, far over the budget; every count looks 30% faster on wxt
    fake = FakeTimer(screen={r: 0.7 * stock_cost(r) for r in MEASURED_ROWS}, scale=100.0)
    plan = plan_from_timer(fake, budget_seconds=30.0)
    confirms = [c for c in fake.calls if c == (1, ("wxt", 1))]
    assert len(confirms) >= 3  # the one-row entry was timed as it runs, despite the budget
    assert plan.route(1) == ("wxt", 1)
    assert set(plan.routes) == {1}  # nothing else was confirmed: stock
    assert sum(1 for c in fake.calls if c[0] == 3 and c[1] == ("wxt", 3)) == 2  # first pass only (2 rounds)


def test_plan_is_measured_once_cached_and_remeasured_when_corrupt(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LTD_CACHE", str(tmp_path))
    model = make_tiny_llama(seed=4)
    backend = HFBackend(model, kernels="auto")
    path = plan_path(plan_key(model))
    assert path.is_file()
    data = json.loads(path.read_text())
    assert data["version"] == PLAN_VERSION
    assert set(data["measured"]) == {str(r) for r in MEASURED_ROWS}
    assert KernelPlan.from_json(data).routes == backend.kernel_plan.routes
    # every measured count has its stock and chosen times; a route is kept only when timed clearly faster
    assert {str(r) for r in MEASURED_ROWS} <= set(data["timings"])
    for rows, t in data["timings"].items():
        if int(rows) in backend.kernel_plan.routes:
            assert t["chosen"] < (1 - MIN_GAIN) * t["stock"]
            assert t["candidate_route"] == list(backend.kernel_plan.route(int(rows)))
        else:
            assert t["chosen"] == t["stock"]
    # cached: a second backend reads the file instead of measuring
    path.write_text(json.dumps({**data, "routes": {"2": ["wxt", 2], "3": ["wxt", 4]}}))
    assert HFBackend(model, kernels="auto").kernel_plan.routes == {2: ("wxt", 2), 3: ("wxt", 4)}
    # a corrupt cache is measured again, with a warning, never a traceback
    path.write_text("{not json")
    with caplog.at_level("WARNING"):
        plan = HFBackend(model, kernels="auto").kernel_plan
    assert "unreadable" in caplog.text
    assert KernelPlan.from_json(json.loads(path.read_text())).routes == plan.routes
    # a route outside the planned range is refused as unreadable, then measured again
    caplog.clear()
    path.write_text(json.dumps({**data, "routes": {"3": ["wxt", 2]}}))
    with caplog.at_level("WARNING"):
        plan = HFBackend(model, kernels="auto").kernel_plan
    assert "unreadable" in caplog.text
    assert plan.route(3) != ("wxt", 2)
    assert KernelPlan.from_json(json.loads(path.read_text())).routes == plan.routes
    # a plan of an older version (routes merely proposed, never timed) is measured again
    caplog.clear()
    path.write_text(json.dumps({**data, "version": PLAN_VERSION - 1, "routes": {"1": ["wxt", 2]}}))
    with caplog.at_level("INFO"):
        plan = HFBackend(model, kernels="auto").kernel_plan
    assert "older version" in caplog.text
    again = json.loads(path.read_text())
    assert again["version"] == PLAN_VERSION and "1" in again["timings"]
    assert KernelPlan.from_json(again).routes == plan.routes
    assert plan_key(model)["version"] == PLAN_VERSION  # and an old key names another file


def test_bad_kernel_mode_is_a_clear_error():
    model = make_tiny_llama(seed=5)
    with pytest.raises(LtdError, match="--kernels must be one of"):
        resolve_plan(HFBackend(model, kernels=KernelPlan()), "fast")


@pytest.mark.parametrize("plan", [ALL_ROWS, PADDED], ids=["wxt", "padded"])
@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 8), (5, 8, 32)])
def test_greedy_output_unchanged_with_every_row_count_on_the_other_path(shape, plan):
    model = make_tiny_llama(seed=6)
    head = make_tiny_head(model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=0)
    prompt = [3, 17, 42, 8, 77, 5]
    ref = hf_greedy(model, prompt, 32)
    backend = HFBackend(model, kernels=plan)
    drafter = Eagle3Drafter(head, model.get_input_embeddings())
    tokens, _ = run_decode(backend, drafter, StaticController(*shape), prompt, 32)
    assert_same_tokens(tokens, ref, model, prompt, f"static {shape} with (W @ x.T).T everywhere")


@pytest.mark.e2e
def test_smollm_static_and_ltd_equal_hf_with_every_row_count_on_the_other_path():
    """The embedded model with its shipped drafter and policies, every verification on the other path."""
    from ltd.engine import Engine, GenerateConfig, default_drafter_spec, load_drafter
    from ltd.models import load_model

    target = load_model("smollm2-135m")
    engine = Engine(target, load_drafter(default_drafter_spec("smollm2-135m", "hf"), target), HFBackend(target.model, kernels=ALL_ROWS))
    for text in ("Write a Python function that reverses a string.", "Name three planets."):
        prompt = engine.encode(text)
        ref = engine.generate(prompt, GenerateConfig(method="hf", max_new_tokens=32)).tokens
        for cfg in (GenerateConfig(method="static", max_new_tokens=32, depth=4, topk=8, size=16),
                    GenerateConfig(method="ltd", max_new_tokens=32)):
            got = engine.generate(prompt, cfg)
            assert_same_tokens(got.tokens, ref, target.model, prompt, f"{cfg.method} on {text!r}")


def test_grouped_heads_are_read_in_place_only_inside_our_forwards(monkeypatch):
    """The SDPA switch is on around the backend's forwards, off for model.generate (the hf baseline)."""
    monkeypatch.delenv(GQA_ENV, raising=False)
    model = make_tiny_llama(seed=7)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    seen = []
    model.model.layers[0].register_forward_hook(lambda *_: seen.append(os.environ.get(GQA_ENV)))
    backend = HFBackend(model, kernels=ALL_ROWS)
    backend.score([1, 2, 3], [-1, 0, 0])  # a tree: masked attention over grouped heads
    assert seen[-1] == "1" and GQA_ENV not in os.environ
    hf_greedy(model, [1, 2, 3], 2)
    assert seen[-1] is None
    stock = HFBackend(make_tiny_llama(seed=7), kernels="stock")
    stock.model.model.layers[0].register_forward_hook(lambda *_: seen.append(os.environ.get(GQA_ENV)))
    stock.score([1, 2, 3], [-1, 0, 0])
    assert seen[-1] is None  # --kernels stock: transformers' own attention path
