"""Shared builders for the RL tests (tiny engines, drafters, hand-made latency models),
plus the latency model's own tests.

The other ``test_rl_*`` files import the helpers from here.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from ltd.backends.hf import HFBackend
from ltd.drafting.lm import LMDrafter
from ltd.engine import Engine
from ltd.errors import LtdError
from ltd.models import LoadedModel
from ltd.rl.latency import LatencyModel, plot_latency, profile

torch.set_num_threads(1)

PROMPTS = [[5, 11, 60, 7, 9], [3, 17, 42, 8, 77, 5, 23], [14, 88, 2, 35]]
TOPK = 3
MAX_DEPTH = 4
MAX_SIZE = 8
MAX_NEW = 24


class TinyTokenizer:
    """Just enough tokenizer for :class:`ltd.engine.Engine` over a tiny random model."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)

    def __len__(self) -> int:
        return 96


def noisy_copy(model, scale: float = 0.05, seed: int = 5):
    """The model with Gaussian noise on every weight: a drafter that agrees often but not always."""
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return noisy.eval()


def tiny_engine(target_model, drafter_model) -> Engine:
    target = LoadedModel("tiny", target_model, TinyTokenizer())
    return Engine(target, LMDrafter(HFBackend(drafter_model)))


def hand_latency(topk: int = TOPK, step: float = 1e-3, verify_base: float = 10e-3, per_token: float = 0.5e-3,
                 overhead: float = 0.2e-3, policy: float = 50e-6, contexts=(8, 256)) -> LatencyModel:
    """A made-up but plausible cost model: verify = base + per_token * (V + 1), +10% at the long context."""
    tokens = [1, 2, 4, 8, 16, 33]
    grid = [[verify_base + per_token * t for t in tokens], [1.1 * (verify_base + per_token * t) for t in tokens]]
    return LatencyModel(
        draft_topk=topk,
        draft_step_seconds=[step] * MAX_DEPTH,
        verify_tokens=tokens,
        verify_contexts=list(contexts),
        verify_seconds=grid[: len(contexts)],
        cycle_overhead_seconds=overhead,
        depth_policy_seconds=policy,
        size_policy_seconds=policy,
        machine={"cpu_model": "test CPU"},
    )


# -- latency model tests -------------------------------------------------------------------


def test_latency_model_predictions():
    lat = hand_latency()
    assert lat.draft_seconds(0) == 0.0
    assert lat.draft_seconds(3) == pytest.approx(3e-3)
    assert lat.draft_seconds(6) == pytest.approx(6e-3)  # beyond the profile: last step's cost
    # on grid, between grid points (linear), beyond the grid (last slope), between contexts
    assert lat.verify_time(4, 8) == pytest.approx(12e-3)
    assert lat.verify_time(3, 8) == pytest.approx(11.5e-3)
    assert lat.verify_time(65, 8) == pytest.approx(10e-3 + 0.5e-3 * 65)
    assert lat.verify_time(4, 132) == pytest.approx(0.5 * (12e-3 + 13.2e-3))
    assert lat.verify_time(4, 10_000) == pytest.approx(13.2e-3)
    assert lat.cycle_seconds(2, 5, 8, depth_policy_calls=2, size_policy_calls=1) == pytest.approx(
        2e-3 + (10e-3 + 0.5e-3 * 6) + 0.2e-3 + 3 * 50e-6
    )
    assert lat.cycle_seconds(0, 30, 8) == pytest.approx(lat.ar_seconds(8)) == pytest.approx(10.7e-3)


def test_latency_model_json_round_trip_and_errors(tmp_path):
    lat = hand_latency()
    path = tmp_path / "lat.json"
    lat.save(path)
    again = LatencyModel.load(path)
    assert again.to_json() == lat.to_json()
    assert again.verify_time(7, 100) == lat.verify_time(7, 100)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind
    data = json.loads(path.read_text())
    data["verify_seconds"] = data["verify_seconds"][:1]
    path.write_text(json.dumps(data))
    with pytest.raises(LtdError, match="re-run ltd profile"):
        LatencyModel.load(path)
    path.write_text("{not json")
    with pytest.raises(LtdError, match="not valid JSON"):
        LatencyModel.load(path)
    with pytest.raises(LtdError, match="does not exist"):
        LatencyModel.load(tmp_path / "missing.json")


def test_profile_measures_the_real_models(tmp_path, tiny_model):
    """The profiler runs the real backend and drafter and writes JSON + PNG with the CPU model."""
    drafter = LMDrafter(HFBackend(noisy_copy(tiny_model)))
    out = tmp_path / "lat.json"
    t0 = time.perf_counter()
    lat = profile(HFBackend(tiny_model), drafter, topk=TOPK, max_depth=3, size=6, verify_tokens=(1, 4, 9),
                  contexts=(16, 64, 4000), repeats=2, cycles=3, policy_sizes=(1, 2, 4, 8), out=out, model_name="tiny")
    assert time.perf_counter() - t0 < 20
    assert lat.verify_contexts == [16, 64]  # 4000 does not fit a 256-position model
    assert len(lat.draft_step_seconds) == 3 and all(s > 0 for s in lat.draft_step_seconds)
    assert all(t > 0 for row in lat.verify_seconds for t in row)
    assert lat.cycle_overhead_seconds > 0 and lat.depth_policy_seconds > 0 and lat.size_policy_seconds > 0
    saved = json.loads(out.read_text())
    assert saved["machine"]["cpu_model"] and saved["format"] == "ltd-latency"
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_latency_writes_png(tmp_path):
    plot_latency(hand_latency(), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
