"""Continuous batching: requests decoded together give each the output it gets alone.

Each request runs the ordinary cycle on its own thread, on a lane of one
:class:`ltd.backends.packed.PackedHF`; the lanes share every target forward. Requests
join and leave at different cycles; each keeps its own drafter, controller, sampler and
cache entries.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_same_tokens, make_tiny_head, run_decode
from ltd.acceptance import SamplingConfig
from ltd.backends.hf import HFBackend
from ltd.backends.packed import BatchLoad, PackedHF
from ltd.batching import BatchedEngine
from ltd.control import ScheduleController, StaticController
from ltd.cycle import decode
from ltd.drafting.base import NullDrafter, fork_drafter
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.hybrid import HybridDrafter
from ltd.drafting.lm import LMDrafter
from ltd.drafting.ngram import NgramDrafter
from ltd.drafting.suffix import SuffixDrafter
from ltd.engine import Engine, GenerateConfig
from ltd.errors import LtdError

PROMPTS = [
    [5, 9, 13, 5, 9, 13, 5, 9, 13, 5, 9],  # repetitive: the model-free drafters match
    [1, 2, 3, 4, 5, 6, 7],
    [40, 41, 42, 43, 40, 41, 42, 43, 40, 41, 30, 31],
    [x % 90 for x in range(20, 60)],
]
MAX_NEW = [40, 12, 30, 25]  # they leave at different cycles
JOIN_AFTER = [0, 2, 5, 9]  # ... and join once the first request made this many cycles


def drafters(tiny_model, other_model, tiny_head):
    """One drafter kind per request: every kind of drafter shares the batch."""
    return [
        NullDrafter(),
        HybridDrafter(SuffixDrafter(), Eagle3Drafter(tiny_head, tiny_model.get_input_embeddings())),
        LMDrafter(HFBackend(other_model)),
        NgramDrafter(),
    ]


CONTROLLERS = [(0, 1, 0), (4, 2, 6), (3, 1, 3), (2, 4, 8)]  # (depth, topk, size); ar first


def run_batched(pool: PackedHF, jobs: list[dict], bind: bool = False) -> list[list[int]]:
    """Decode every job on its own thread and lane; job i joins once job 0 finished
    ``join_after`` cycles. ``bind`` hands each controller its lane's load. Returns each
    job's tokens."""
    out: list[list[int] | None] = [None] * len(jobs)
    progress = threading.Condition()
    cycles = [0]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        job = jobs[i]
        with progress:
            progress.wait_for(lambda: cycles[0] >= job["join_after"] or out[0] is not None)
        try:
            with pool.lane() as lane:
                if bind:
                    job["controller"].bind_load(lane.load)
                tokens = []
                for res in decode(lane, job["drafter"], job["controller"], job["prompt"], job["max_new"],
                                  topk=job["controller"].topk, sampling=job.get("sampling"), seed=job.get("seed")):
                    tokens += res.new_tokens
                    if i == 0:
                        with progress:
                            cycles[0] += 1
                            progress.notify_all()
                out[i] = tokens
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)
        finally:
            with progress:
                progress.notify_all()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "a lane is stuck"
    return out


def make_jobs(tiny_model, other_model, tiny_head, sampling=None) -> list[dict]:
    ds = drafters(tiny_model, other_model, tiny_head)
    return [
        dict(prompt=p, max_new=n, join_after=j, drafter=d, controller=StaticController(*c), sampling=sampling, seed=100 + i)
        for i, (p, n, j, d, c) in enumerate(zip(PROMPTS, MAX_NEW, JOIN_AFTER, ds, CONTROLLERS))
    ]


@pytest.fixture(scope="module")
def tiny_head_for_batch(tiny_model):
    return make_tiny_head(tiny_model, draft_vocab_size=48, layer_ids=[0, 1, 2])


def test_requests_in_a_batch_equal_each_alone(tiny_model, other_model, tiny_head_for_batch):
    alone = [
        run_decode(HFBackend(tiny_model), j["drafter"], j["controller"], j["prompt"], j["max_new"])[0]
        for j in make_jobs(tiny_model, other_model, tiny_head_for_batch)
    ]
    pool = PackedHF(HFBackend(tiny_model), max_lanes=4)
    together = run_batched(pool, make_jobs(tiny_model, other_model, tiny_head_for_batch))
    for i, (got, ref) in enumerate(zip(together, alone)):
        assert len(ref) == MAX_NEW[i]
        assert_same_tokens(got, ref, tiny_model, PROMPTS[i], f"request {i}")
    # the forwards were shared: fewer than the cycles (plus prefills) the requests ran alone
    assert pool.forwards < sum(MAX_NEW)
    assert pool.rows >= sum(len(p) for p in PROMPTS)
    assert pool.active == 0


def test_sampling_in_a_batch_equals_sampling_alone(tiny_model, other_model, tiny_head_for_batch):
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    alone = [
        run_decode(HFBackend(tiny_model), j["drafter"], j["controller"], j["prompt"], j["max_new"], sampling=sampling, seed=j["seed"])[0]
        for j in make_jobs(tiny_model, other_model, tiny_head_for_batch)
    ]
    pool = PackedHF(HFBackend(tiny_model), max_lanes=4)
    together = run_batched(pool, make_jobs(tiny_model, other_model, tiny_head_for_batch, sampling))
    assert together == alone
    assert len({tuple(t) for t in together}) == 4


def test_a_closed_request_frees_its_cache_entries(tiny_model):
    pool = PackedHF(HFBackend(tiny_model), max_lanes=2)
    ref = run_decode(HFBackend(tiny_model), NgramDrafter(), StaticController(3, 2, 5), PROMPTS[0], 30)[0]
    b_started = threading.Event()
    a_tokens: list[int] = []

    def request_a() -> None:
        b_started.wait(30)
        with pool.lane() as lane:
            for res in decode(lane, NgramDrafter(), StaticController(3, 2, 5), PROMPTS[0], 30, topk=2):
                a_tokens.extend(res.new_tokens)

    thread = threading.Thread(target=request_a)
    thread.start()
    lane_b = pool.lane()
    try:
        gen = decode(lane_b, NullDrafter(), StaticController(0, 1, 0), PROMPTS[3], 60, topk=1)
        next(gen)
        b_started.set()
        for _ in range(4):  # B decodes beside A for a few cycles, then its client goes away
            next(gen)
        held = len(lane_b.slots)
        assert held >= len(PROMPTS[3]) + 4
        gen.close()
    finally:
        b_started.set()
        lane_b.close()
    thread.join(60)
    assert a_tokens == ref
    # A went on alone, so the cache was compacted to A's entries: B's are gone
    assert pool.active == 0 and pool._length <= len(PROMPTS[0]) + 30
    with pytest.raises(LtdError, match="closed"):
        lane_b.score([1], [-1])


def test_the_batch_bound_and_unbatchable_drafters_are_one_line_errors(tiny_model, tiny_head_for_batch):
    pool = PackedHF(HFBackend(tiny_model), max_lanes=1)
    with pool.lane():
        with pytest.raises(LtdError, match="already holds 1"):
            pool.lane()
    with pytest.raises(LtdError, match="at least 1"):
        PackedHF(HFBackend(tiny_model), max_lanes=0)
    with pytest.raises(LtdError, match="--max-batch 1"):
        fork_drafter(SimpleNamespace())
    with pytest.raises(LtdError, match="needs the hf backend"):
        BatchedEngine(SimpleNamespace(backend_name="llamacpp"), 4)


def test_forks_share_weights_and_the_store_but_not_state(tiny_model, tiny_head_for_batch):
    head = Eagle3Drafter(tiny_head_for_batch, tiny_model.get_input_embeddings())
    twin = fork_drafter(head)
    assert twin.head is head.head and twin is not head
    suffix = SuffixDrafter()
    store = suffix.enable_store(1000)
    twin = fork_drafter(suffix)
    assert twin.store is store
    twin.reset()  # as the cycle does when a request starts
    twin.sync(PROMPTS[0] + [7], None)  # prompt + the first token
    twin.sync(PROMPTS[0] + [7, 8, 9, 10], None)  # ... and the output so far
    assert suffix._tokens == []
    twin.reset()  # a finished request gives its output to the shared store
    assert len(store) > 0
    lm = LMDrafter(HFBackend(tiny_model))
    assert fork_drafter(lm).backend.model is tiny_model and fork_drafter(lm).backend is not lm.backend


def test_a_lane_reports_the_load_of_its_batch(tiny_model):
    pool = PackedHF(HFBackend(tiny_model), max_lanes=3)
    with pool.lane() as lane, pool.lane():
        load = lane.load()
        assert (load.active, load.queued, load.queued_rows) == (2, 0, 0)
    assert pool.load().active == 0


# -- end to end on the embedded model -------------------------------------------------------

MODEL = "smollm2-135m"  # the embedded default model
E2E_PROMPTS = [
    "Write a Python function that returns the squares of a list of numbers.",
    "Repeat exactly: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
]


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["static", "greedy"])
def test_batched_engine_on_the_embedded_model_equals_each_alone(method):
    torch.set_num_threads(1)
    engine = Engine.load(MODEL)
    cfg = GenerateConfig(method=method, max_new_tokens=48, temperature=0.0)
    engine.prepare(cfg)
    alone = [list(engine.generate(engine.encode(p), cfg).tokens) for p in E2E_PROMPTS]
    batch = BatchedEngine(engine, max_batch=3)
    out: list[list[int] | None] = [None] * len(E2E_PROMPTS)

    def work(i: int) -> None:
        out[i] = [t for r in batch.stream(engine.encode(E2E_PROMPTS[i]), cfg) for t in r.new_tokens]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(E2E_PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert out == alone
    assert batch.pool.forwards < sum(len(a) for a in alone)


def test_the_schedule_baseline_drafts_less_as_the_batch_grows():
    ctrl = ScheduleController("1:4,2:3,4:1,8:0", topk=2)
    lengths = []
    for active in (1, 2, 3, 4, 7, 8, 12):
        ctrl.bind_load(lambda active=active: BatchLoad(active, 0, 0))
        lengths.append(ctrl.depth_limit())
    assert lengths == [4, 3, 3, 1, 1, 0, 0]
    for bad in ("1-3", "0:2", "2:-1", ""):
        with pytest.raises(LtdError, match="--schedule"):
            ScheduleController(bad)


def test_the_schedule_baseline_in_a_batch_equals_each_alone(tiny_model, other_model):
    jobs = [
        dict(prompt=p, max_new=n, join_after=j, drafter=NgramDrafter(), controller=ScheduleController("1:4,2:2,3:1", topk=2))
        for p, n, j in zip(PROMPTS[:3], MAX_NEW[:3], JOIN_AFTER[:3])
    ]
    alone = [run_decode(HFBackend(tiny_model), NgramDrafter(), ScheduleController("1:4,2:2,3:1", topk=2), j["prompt"], j["max_new"])[0]
             for j in jobs]
    pool = PackedHF(HFBackend(tiny_model), max_lanes=3)
    together = run_batched(pool, jobs, bind=True)  # as Engine.stream does: each controller reads its batch
    assert together == alone


def test_the_compute_thread_runs_calls_in_order_and_hands_back_results_and_errors():
    from ltd.runtime import ComputeThread

    compute = ComputeThread(1)
    try:
        names = [compute.call(lambda: threading.current_thread().name) for _ in range(3)]
        assert names == ["ltd-compute"] * 3 and threading.current_thread().name != "ltd-compute"
        assert compute.call(lambda a, b=0: a + b, 2, b=3) == 5
        # a call from the compute thread itself runs in place instead of waiting on itself
        assert compute.call(lambda: compute.call(lambda: threading.current_thread().name)) == "ltd-compute"
        with pytest.raises(LtdError, match="boom"):
            compute.call(lambda: (_ for _ in ()).throw(LtdError("boom")))
        assert compute.call(torch.get_num_threads) == 1  # its own team size, set on its thread
    finally:
        compute.close()


def test_a_batch_whose_forwards_run_on_the_compute_thread_equals_each_alone(tiny_model, other_model, tiny_head_for_batch, monkeypatch):
    """As in a server: every forward goes to one compute thread, lanes draft on their own."""
    import ltd.backends.packed as packed
    from ltd.runtime import ComputeThread

    compute = ComputeThread(1)
    threads: set[str] = set()
    target = None
    real_forward = HFBackend.forward

    def forward(self, *args, **kwargs):
        if self is target:  # the batch's target (an LM drafter's own forwards stay on its lane)
            threads.add(threading.current_thread().name)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(packed, "on_compute_thread", compute.call)
    monkeypatch.setattr(HFBackend, "forward", forward)
    try:
        jobs = make_jobs(tiny_model, other_model, tiny_head_for_batch)
        alone = [run_decode(HFBackend(tiny_model), j["drafter"], j["controller"], j["prompt"], j["max_new"])[0] for j in jobs]
        target = HFBackend(tiny_model)
        together = run_batched(PackedHF(target, max_lanes=4), make_jobs(tiny_model, other_model, tiny_head_for_batch))
    finally:
        compute.close()
    assert threads == {"ltd-compute"}
    for i, (got, ref) in enumerate(zip(together, alone)):
        assert_same_tokens(got, ref, tiny_model, PROMPTS[i], f"request {i}")
