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
    KernelPlan,
    KernelState,
    PlannedLinear,
    decide,
    install,
    installed_state,
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
    state.forced = "wxt"
    with state.use(KernelPlan()):
        assert state.route(1) == ("wxt", 1)  # measuring: forced, never padded
        assert state.route(MAX_PLANNED_ROWS + 1) == ("linear", MAX_PLANNED_ROWS + 1)


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
    assert plan.summary() == {"wxt_rows": [1, 2, 3, 5, 6, 7, 8], "padded": {"1": 2, "3": 4}}


def test_plan_is_measured_once_cached_and_remeasured_when_corrupt(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LTD_CACHE", str(tmp_path))
    model = make_tiny_llama(seed=4)
    backend = HFBackend(model, kernels="auto")
    path = plan_path(plan_key(model))
    assert path.is_file()
    data = json.loads(path.read_text())
    assert set(data["measured"]) == {str(r) for r in MEASURED_ROWS}
    assert KernelPlan.from_json(data).routes == backend.kernel_plan.routes
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
