"""The hf backend's measured matmul plan: same products, same greedy text, cached per machine."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_tokens, hf_greedy, make_tiny_head, make_tiny_llama, run_decode
from ltd.backends.hf import HFBackend
from ltd.backends.hf_kernels import (
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

ALL_ROWS = KernelPlan(frozenset(range(1, MAX_PLANNED_ROWS + 1)))


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
        with state.use(ALL_ROWS):
            out = layer(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_plan_applies_only_to_its_row_counts():
    state = KernelState()
    with state.use(KernelPlan(frozenset({2, 3}))):
        assert [state.use_wxt(r) for r in (1, 2, 3, 4)] == [False, True, True, False]
    assert not state.use_wxt(2)  # the plan ends with the forward
    state.forced = "wxt"
    with state.use(KernelPlan()):
        assert state.use_wxt(1) and not state.use_wxt(MAX_PLANNED_ROWS + 1)


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


def test_decide_takes_clear_wins_and_the_nearest_measured_count():
    measured = {
        1: {"linear": 1.0, "wxt": 1.1},
        2: {"linear": 2.0, "wxt": 1.0},
        4: {"linear": 1.0, "wxt": 0.99},  # within the noise margin: stays linear
        8: {"linear": 3.0, "wxt": 1.0},
    }
    rows = decide(measured)
    assert 1 not in rows and 2 in rows and 3 in rows  # 3 is nearest to 2 and 4: the lower wins
    assert 4 not in rows and 5 not in rows and 6 not in rows  # 6: as far from 4 as from 8
    assert all(r in rows for r in range(7, MAX_PLANNED_ROWS + 1))
    assert decide({}) == frozenset()


def test_plan_is_measured_once_cached_and_remeasured_when_corrupt(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LTD_CACHE", str(tmp_path))
    model = make_tiny_llama(seed=4)
    backend = HFBackend(model, kernels="auto")
    path = plan_path(plan_key(model))
    assert path.is_file()
    data = json.loads(path.read_text())
    assert set(data["measured"]) == {str(r) for r in MEASURED_ROWS}
    assert KernelPlan.from_json(data).wxt_rows == backend.kernel_plan.wxt_rows
    # cached: a second backend reads the file instead of measuring
    path.write_text(json.dumps({**data, "wxt_rows": [2, 3]}))
    assert HFBackend(model, kernels="auto").kernel_plan.wxt_rows == frozenset({2, 3})
    # a corrupt cache is measured again, with a warning, never a traceback
    path.write_text("{not json")
    with caplog.at_level("WARNING"):
        plan = HFBackend(model, kernels="auto").kernel_plan
    assert "unreadable" in caplog.text
    assert KernelPlan.from_json(json.loads(path.read_text())).wxt_rows == plan.wxt_rows


def test_bad_kernel_mode_is_a_clear_error():
    model = make_tiny_llama(seed=5)
    with pytest.raises(LtdError, match="--kernels must be one of"):
        resolve_plan(HFBackend(model, kernels=KernelPlan()), "fast")


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 8), (5, 8, 32)])
def test_greedy_output_unchanged_with_every_row_count_on_the_other_path(shape):
    model = make_tiny_llama(seed=6)
    head = make_tiny_head(model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=0)
    prompt = [3, 17, 42, 8, 77, 5]
    ref = hf_greedy(model, prompt, 32)
    backend = HFBackend(model, kernels=ALL_ROWS)
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
