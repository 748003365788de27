"""Controllers that decide from the machine's measured costs (``greedy``) and SuffixDecoding's
rule (``suffix-rule``): their choice rules, the quick cost profile and its per-machine cache,
and the keystone -- whatever they decide, greedy output equals plain greedy output.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import logging

import numpy as np
import pytest
import torch

import ltd.control.costcache as costcache
from conftest import assert_same_tokens, first_difference, hf_greedy, run_decode
from test_llamacpp_exact import exact_env, exact_kernels, lmodel  # noqa: F401  (fixtures of the llama.cpp e2e test)
from ltd.backends.hf import HFBackend
from ltd.control import LatencyModel, SuffixRuleController, ThroughputController
from ltd.control.costcache import cached_quick_profile, cost_key, cost_path
from ltd.control.measure import quick_profile
from ltd.backends.packed import BatchLoad
from ltd.control.throughput import best_size
from ltd.cycle import CycleResult
from ltd.controller import DraftStepState
from ltd.drafting.lm import LMDrafter
from ltd.drafting.ngram import NgramDrafter
from ltd.drafting.suffix import SuffixDrafter
from ltd.engine import Engine, GenerateConfig
from ltd.errors import LtdError
from ltd.models import LoadedModel
from ltd.tree import Tree

PROMPT = [3, 17, 42, 8, 77, 5, 23, 3, 17, 42, 8, 61, 9, 3, 17, 42, 8, 77, 5]
TOKENS = [1, 2, 3, 5, 9, 17, 33]


def cost_table(verify_ms, draft_ms: float = 0.2, overhead_ms: float = 0.2) -> LatencyModel:
    """A one-context cost table with the given verification costs (ms) at TOKENS."""
    return LatencyModel(
        draft_topk=8, draft_step_seconds=[draft_ms / 1e3] * 2, verify_tokens=TOKENS, verify_contexts=[128],
        verify_seconds=[[v / 1e3 for v in verify_ms]], cycle_overhead_seconds=overhead_ms / 1e3,
    )


# llama.cpp with SmolLM2-135M on one core: one token 15 ms, nine ~83 ms (nearly linear)
LINEAR = cost_table([15 + 8.5 * (t - 1) for t in TOKENS])
# a wide machine: verifying 33 tokens costs what one does
FLAT = cost_table([15.0] * len(TOKENS))


def chain_tree(probs) -> Tree:
    """A chain whose node i has cumulative probability probs[i]."""
    tree = Tree.root(1)
    parent = torch.zeros(1, dtype=torch.long)
    for i, p in enumerate(probs):
        parent = tree.add(torch.tensor([10 + i]), parent, torch.tensor([float(np.log(p))]))
    return tree


def size_state(tree: Tree) -> DraftStepState:
    return DraftStepState(tree.max_depth, torch.empty(0), 128, tree, 8)


# -- the choice rule ------------------------------------------------------------------------


def test_linear_costs_and_low_probabilities_choose_a_plain_step():
    probs = np.array([0.4, 0.2, 0.1, 0.05])
    verify = LINEAR.verify_curve(8, 128)
    assert best_size(probs, 0.2e-3, verify, 0.2e-3)[0] == 0
    assert ThroughputController(LINEAR).choose_size(size_state(chain_tree([0.4, 0.2, 0.1, 0.05]))) == 0


def test_flat_costs_and_high_probabilities_verify_everything():
    probs = [0.95, 0.9, 0.85, 0.8, 0.75]
    assert best_size(np.array(probs), 0.4e-3, FLAT.verify_curve(8, 128), 0.2e-3)[0] == len(probs)
    assert ThroughputController(FLAT).choose_size(size_state(chain_tree(probs))) == len(probs)


def test_a_long_confident_chain_pays_even_on_linear_costs():
    """The exception on llama.cpp: a long copy chain nearly sure to be accepted."""
    probs = [0.99] * 16
    v = ThroughputController(LINEAR).choose_size(size_state(chain_tree(probs)))
    assert v == 16


def test_drafting_stops_when_one_more_level_cannot_pay():
    ctrl = ThroughputController(LINEAR)
    root = DraftStepState(0, torch.empty(0), 128, Tree.root(1), 8)
    assert ctrl.continue_drafting(root)  # an optimistic first level (a sure child) would pay
    weak = chain_tree([0.3])
    assert not ctrl.continue_drafting(DraftStepState(1, torch.tensor([np.log(0.3)]), 128, weak, 8))
    strong = chain_tree([0.99])
    assert ctrl.continue_drafting(DraftStepState(1, torch.tensor([np.log(0.99)]), 128, strong, 8))
    padded = DraftStepState(1, torch.tensor([float("-inf")]), 128, chain_tree([0.99]), 8)
    assert not ctrl.continue_drafting(padded)  # nothing below: the drafter ran out


# a CPU batch: the weights are read once per forward, so rows cost little up to ~8, then compute
BATCHED = cost_table([15.0 + (0.3 * min(t, 8) + 4.0 * max(t - 8, 0)) for t in TOKENS])


def test_in_a_batch_the_size_shrinks_with_the_load_down_to_a_plain_step():
    """The same chain, decided alone and as one of a growing batch: the other sequences'
    rows come first on the cost curve and their tokens count, so drafted rows must beat
    the batch's throughput, not one sequence's."""
    def sizes(probs) -> list[int]:
        """V for batches of 1, 2, 4 and 8 sequences, the others decoding plainly (one row each)."""
        out = []
        for n in (1, 2, 4, 8):
            ctrl = ThroughputController(BATCHED)
            ctrl.bind_load(lambda n=n: BatchLoad(n, n - 1, n - 1, slots=128, mean_tokens=1.5))
            out.append(ctrl.choose_size(size_state(chain_tree(probs))))
        return out

    strong, weak = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.5, 0.3, 0.2]
    assert sizes(strong)[0] == ThroughputController(BATCHED).choose_size(size_state(chain_tree(strong))) == 6
    assert sizes(strong) == [6, 6, 5, 1]  # rows past the flat part of the curve must each pay 4 ms
    assert sizes(weak) == [3, 3, 1, 0]  # weak drafts: plain decoding once the batch fills the flat part


def test_in_a_batch_the_other_lanes_work_lengthens_the_cycle():
    """Lanes do their own work (drafting, acceptance) one at a time between forwards, so a
    batch's cycle lasts all of it plus the forward. A longer cycle lowers the batch's
    tokens per second without drafting, so a drafted row has a lower bar to clear: with
    busy neighbours the same chain is verified deeper, never shallower."""
    probs = [0.6, 0.5, 0.4, 0.3]
    def size(work_seconds: float) -> int:
        ctrl = ThroughputController(BATCHED)
        ctrl.bind_load(lambda: BatchLoad(4, 3, 3, slots=128, mean_tokens=1.5, mean_work_seconds=work_seconds))
        return ctrl.choose_size(size_state(chain_tree(probs)))

    sizes = [size(w) for w in (0.0, 0.01, 0.05, 0.2)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] == len(probs)


def test_history_pauses_drafting_that_does_not_pay_and_backs_off():
    ctrl = ThroughputController(LINEAR, max_pause=4)
    root = DraftStepState(0, torch.empty(0), 128, Tree.root(1), 8)
    miss = CycleResult(new_tokens=[1], cycle=1, depth=1, drafted=8, size=0, num_accepted=0)
    plain = CycleResult(new_tokens=[1], cycle=2)
    pauses = []
    for _ in range(4):
        assert ctrl.continue_drafting(root)  # a probe
        ctrl.observe_result(miss)
        n = 0
        while not ctrl.continue_drafting(root):
            ctrl.observe_result(plain)
            n += 1
        pauses.append(n)
    assert pauses == [1, 2, 4, 4]
    hit = CycleResult(new_tokens=list(range(17)), cycle=3, depth=16, drafted=16, size=16, num_accepted=16)
    ctrl.observe_result(hit)  # a probe that paid: drafting goes on and the pause resets
    assert ctrl.continue_drafting(root) and ctrl.backoff == 1


# -- the quick profile and its cache ----------------------------------------------------------


def test_quick_profile_measures_a_small_table(tiny_model):
    costs = quick_profile(HFBackend(tiny_model), SuffixDrafter(), topk=4, budget_seconds=2.0)
    assert costs.verify_tokens == TOKENS and len(costs.verify_contexts) == 1
    # the suffix drafter hands over its whole tree in the first step: the rest cost nothing
    assert 1 <= len(costs.draft_step_seconds) <= 2 and costs.draft_step_seconds[0] > 0
    assert all(s == 0 for s in costs.draft_step_seconds[1:])
    assert all(s > 0 for s in costs.verify_seconds[0]) and costs.cycle_overhead_seconds > 0
    assert LatencyModel.from_json(json.loads(json.dumps(costs.to_json()))).verify_tokens == TOKENS


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """The cache under tmp_path, and a list that grows by one per measurement."""
    monkeypatch.setenv("LTD_CACHE", str(tmp_path))
    calls = []
    real = costcache.quick_profile

    def measure(*args, **kwargs):
        calls.append(kwargs.get("topk"))
        return real(*args, budget_seconds=1.0, **kwargs)

    monkeypatch.setattr(costcache, "quick_profile", measure)
    return calls


def test_the_quick_profile_is_cached_per_machine(tiny_model, counted, tmp_path):
    backend = HFBackend(tiny_model)
    kw = dict(model="tiny", backend_name="hf", drafter_name="suffix", topk=4)
    first = cached_quick_profile(backend, SuffixDrafter(), **kw)
    again = cached_quick_profile(backend, SuffixDrafter(), **kw)
    assert len(counted) == 1  # the second call read the file
    assert again.verify_seconds == first.verify_seconds
    path = cost_path(cost_key(backend, "tiny", "hf", "suffix", 4))
    assert path.is_file() and path.parent == tmp_path / "costs" and path.name.startswith("tiny-hf-t")
    stored = json.loads(path.read_text())["machine"]["cost_key"]
    assert stored["model"] == "tiny" and stored["threads"] == torch.get_num_threads() and stored["cpu_model"]


def test_the_cache_key_names_machine_model_and_threads(tiny_model):
    backend = HFBackend(tiny_model)
    base = cost_key(backend, "tiny", "hf", "suffix", 8)

    class Threaded:
        dtype, device, threads = backend.dtype, backend.device, base["threads"] + 3

    paths = {
        cost_path(base),
        cost_path(cost_key(backend, "other", "hf", "suffix", 8)),
        cost_path(cost_key(Threaded(), "tiny", "hf", "suffix", 8)),
        cost_path({**base, "cpu_model": "another CPU"}),
        cost_path(cost_key(backend, "tiny", "hf", "ngram", 8)),
    }
    assert len(paths) == 5
    assert f"-t{base['threads'] + 3}-" in cost_path(cost_key(Threaded(), "tiny", "hf", "suffix", 8)).name


def test_llama_cpp_exact_and_stock_builds_keep_separate_profiles():
    class Build:
        dtype, device, threads = "q4", "cpu", 2

        def __init__(self, exact: bool) -> None:
            self.exact = exact

    exact, stock = (cost_key(Build(e), "tiny", "llamacpp", "suffix", 8) for e in (True, False))
    assert exact["exact_kernels"] is True and stock["exact_kernels"] is False
    assert cost_path(exact) != cost_path(stock)
    assert "exact_kernels" not in cost_key(Build(True), "tiny", "hf", "suffix", 8)  # the hf backend has no builds


def test_beside_a_compute_thread_the_profile_is_keyed_and_measured_where_forwards_run(tiny_model, counted, monkeypatch):
    """A batch lane runs at one torch thread; its controller must read (or measure, on the
    compute thread) the profile of the thread count the forwards use, not its own."""
    from ltd.runtime import ComputeThread

    compute = ComputeThread(torch.get_num_threads() + 2)
    monkeypatch.setattr(costcache, "compute_thread", lambda: compute)
    monkeypatch.setattr(costcache, "on_compute_thread", compute.call)
    where = []
    measure = costcache.quick_profile
    monkeypatch.setattr(costcache, "quick_profile", lambda *a, **k: (where.append(threading.current_thread().name), measure(*a, **k))[1])
    try:
        backend = HFBackend(tiny_model)
        assert cost_key(backend, "tiny", "hf", "suffix", 4)["threads"] == compute.threads
        cached_quick_profile(backend, SuffixDrafter(), model="tiny", backend_name="hf", drafter_name="suffix", topk=4)
    finally:
        compute.close()
    assert where == ["ltd-compute"] and len(counted) == 1


@pytest.mark.parametrize("damage", ["{not json", json.dumps({"format": "ltd-latency", "version": 1, "draft_topk": 4}), "[]"])
def test_a_corrupt_cache_file_is_measured_again_with_a_warning(tiny_model, counted, caplog, damage):
    backend = HFBackend(tiny_model)
    kw = dict(model="tiny", backend_name="hf", drafter_name="suffix", topk=4)
    cached_quick_profile(backend, SuffixDrafter(), **kw)
    path = cost_path(cost_key(backend, "tiny", "hf", "suffix", 4))
    path.write_text(damage)
    with caplog.at_level(logging.WARNING, logger="ltd.control.costcache"):
        costs = cached_quick_profile(backend, SuffixDrafter(), **kw)
    assert len(counted) == 2 and costs.verify_tokens == TOKENS
    assert "measuring this machine again" in caplog.text
    assert LatencyModel.load(path).verify_tokens == TOKENS  # the file was rewritten


# -- losslessness ----------------------------------------------------------------------------


class _Tok:
    """Enough of a tokenizer for Engine.result."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _target(model) -> LoadedModel:
    return LoadedModel(name="tiny", model=model, tokenizer=_Tok())


@pytest.mark.parametrize("costs", [LINEAR, FLAT], ids=["linear", "flat"])
def test_greedy_equals_plain_greedy_on_hf(tiny_model, tiny_backend, other_model, costs):
    ref = hf_greedy(tiny_model, PROMPT, 60)
    suffix = SuffixDrafter()
    suffix.enable_store()
    drafted = 0
    for label, drafter in (("suffix", suffix), ("suffix again", suffix), ("other", LMDrafter(HFBackend(other_model)))):
        got, results = run_decode(tiny_backend, drafter, ThroughputController(costs, topk=4), PROMPT, 60)
        assert_same_tokens(got, ref, tiny_model, PROMPT, f"greedy/{label}")
        drafted += sum(r.size for r in results[1:])
    assert drafted > 0  # it verified drafts somewhere, not only plain steps


def test_suffix_rule_equals_plain_greedy_and_drafts_the_whole_trie(tiny_model, tiny_backend):
    ref = hf_greedy(tiny_model, PROMPT, 60)
    drafter = SuffixDrafter()
    drafter.enable_store()
    runs = []
    for run in range(2):
        ctrl = SuffixRuleController(topk=4)
        ctrl.bind_drafter(drafter)
        got, results = run_decode(tiny_backend, drafter, ctrl, PROMPT, 60)
        assert_same_tokens(got, ref, tiny_model, PROMPT, f"suffix-rule run {run}")
        runs.append(results[1:])
    # no match: the root step finds nothing to draft, and the cycle is a plain step
    assert any(r.drafted == 0 and r.size == 0 for r in runs[0])
    # the second run follows the stored output: deep chains, verified whole and accepted whole
    assert max(r.depth for r in runs[1]) >= 8
    assert max(r.num_accepted for r in runs[1]) >= 8


def test_both_methods_through_the_engine(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("LTD_CACHE", str(tmp_path))
    engine = Engine(_target(tiny_model), SuffixDrafter())
    ref = hf_greedy(tiny_model, PROMPT, 24)
    for method in ("greedy", "suffix-rule"):
        cfg = GenerateConfig(method=method, max_new_tokens=24)
        engine.prepare(cfg)
        assert engine.generate(PROMPT, cfg).tokens == ref
    assert list((tmp_path / "costs").glob("tiny-hf-*.json"))  # greedy measured and cached the machine


def test_suffix_rule_refuses_other_drafters(tiny_model):
    engine = Engine(_target(tiny_model), NgramDrafter())
    with pytest.raises(LtdError, match="--drafter suffix or hybrid:suffix"):
        engine.prepare(GenerateConfig(method="suffix-rule"))


def test_greedy_reads_a_given_latency_file(tiny_model, tmp_path):
    path = tmp_path / "latency.json"
    LINEAR.save(path)
    engine = Engine(_target(tiny_model), SuffixDrafter())
    engine.latency_file = str(path)
    assert engine.costs(8).verify_seconds == LINEAR.verify_seconds


# -- llama.cpp, the embedded model ---------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_both_methods_equal_plain_greedy_on_llamacpp(request):
    """On the embedded GGUF (exact mode): the quick profile's choices, a flat table's and
    the suffix rule all emit llama.cpp's plain greedy output token for token."""
    from test_llamacpp_exact import CHAT, TEXT, new_backend, tokenize

    lmodel = request.getfixturevalue("lmodel")  # the exact-mode model of the llama.cpp tests (skips without it)
    request.getfixturevalue("exact_kernels")
    backend = new_backend(lmodel)
    drafter = SuffixDrafter()
    drafter.enable_store()
    measured = quick_profile(backend, drafter, topk=4, budget_seconds=3.0)
    verified = 0
    for text in (CHAT[0], TEXT + TEXT[:200]):
        prompt = tokenize(lmodel, text)
        ref = backend.greedy_generate(prompt, 32)
        rule = SuffixRuleController(topk=4)
        rule.bind_drafter(drafter)
        for name, ctrl in (("greedy", ThroughputController(measured, topk=4)), ("greedy-flat", ThroughputController(FLAT, topk=4)),
                           ("suffix-rule", rule)):
            got, results = run_decode(backend, drafter, ctrl, prompt, 32, topk=4)
            pos = first_difference(got, ref)
            assert pos is None, f"{name} on {text[:30]!r}: differs from plain greedy at token {pos}"
            verified += sum(r.size for r in results[1:])
    assert verified > 0
    backend.close()

def test_the_methods_are_chosen_by_name_in_bench_and_serve():
    from ltd.bench.methods import parse_methods
    from ltd.serve.cli import resolve_method

    for backend in ("hf", "llamacpp"):
        labels = [m.label for m in parse_methods("greedy,suffix-rule", backend)]
        assert labels[1:] == ["greedy", "suffix-rule"]
    assert resolve_method("smollm2-135m", "suffix", "greedy", "llamacpp") == ("greedy", "suffix")
    with pytest.raises(LtdError, match="--method suffix-rule needs a drafter"):
        resolve_method("smollm2-135m", "none", "suffix-rule", "hf")
