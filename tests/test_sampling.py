"""Sampling is lossless: speculative sampling draws from exactly the target's distribution.

On a vocabulary of 8 the exact distribution of the first three generated tokens
(8^3 = 512 sequences) is enumerated from the target's own probabilities
(:func:`ltd.acceptance.target_probs`, i.e. temperature and top-p applied), and compared
with the empirical distribution of many seeded speculative generations by a chi-square
goodness-of-fit test. Seeds are fixed, so the test is deterministic.

Power: the same pipeline with a plausible but wrong acceptance rule (accept a drafted
candidate with probability p and otherwise resample from p instead of the residual) and
the correct samples against a slightly shifted distribution must both be rejected by the
same test, so a pass means something.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import ltd.cycle
from conftest import make_tiny_llama, run_decode
from ltd.acceptance import Accepted, SamplingConfig, target_probs
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.drafting.lm import LMDrafter

VOCAB = 8
PROMPT = [1, 5, 2]
NEW = 3
SHAPE = (2, 2, 4)  # depth 2, topk 2, size 4: tokens 2 and 3 come from one verified tree
N_SAMPLES = 1500
N_POWER = 600
MIN_EXPECTED = 5.0  # chi-square cells with fewer expected counts are pooled
Z_THRESHOLD = 4.75  # one-sided normal quantile for p = 1e-6


@pytest.fixture(scope="module")
def target():
    return make_tiny_llama(seed=7, vocab_size=VOCAB, hidden_size=16, num_layers=1, initializer_range=0.3, max_position_embeddings=32)


@pytest.fixture(scope="module")
def other():
    return make_tiny_llama(seed=8, vocab_size=VOCAB, hidden_size=16, num_layers=1, initializer_range=0.3, max_position_embeddings=32)


@torch.inference_mode()
def exact_distribution(model, sampling: SamplingConfig) -> torch.Tensor:
    """P(t1, t2, t3) under the target's sampling distribution, shape [V, V, V] (float64)."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # [(t1, t2)]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(pairs), -1), pairs], dim=1)
    logits = model(input_ids=ids).logits.double()
    P = len(PROMPT)
    rows = [logits[0, P - 1], logits[:, P], logits[:, P + 1]]
    if sampling.top_p < 1.0:
        # no top-p cut may sit near a boundary, or fp32 noise (~1e-6) would decide it
        for lg in rows:
            sp = torch.sort(torch.softmax(lg.float() / sampling.temperature, -1), descending=True, dim=-1).values
            assert float(((sp.cumsum(-1) - sp) - sampling.top_p).abs().min()) > 1e-4
    p1 = target_probs(rows[0], sampling).double()  # [V]
    p2 = target_probs(rows[1], sampling).double().view(VOCAB, VOCAB, VOCAB)[:, 0, :]  # P(t2 | t1)
    p3 = target_probs(rows[2], sampling).double().view(VOCAB, VOCAB, VOCAB)  # P(t3 | t1, t2)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    assert abs(float(joint.sum()) - 1.0) < 1e-5  # target_probs works in float32
    return joint / joint.sum()


def sample_counts(model, drafter, sampling: SamplingConfig, n: int, seed0: int, accepted: Counter | None = None) -> Counter:
    """Counts of the generated 3-token sequences; ``accepted`` collects drafted tokens
    accepted per cycle (to check that the tree paths were really exercised)."""
    backend = HFBackend(model)
    ctrl = StaticController(*SHAPE)
    counts: Counter = Counter()
    for s in range(seed0, seed0 + n):
        tokens, results = run_decode(backend, drafter, ctrl, PROMPT, NEW, sampling=sampling, seed=s)
        assert len(tokens) == NEW
        counts[tuple(tokens)] += 1
        if accepted is not None:
            accepted.update(r.num_accepted for r in results[1:])
    return counts


def chi_square(counts: Counter, probs: torch.Tensor) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, rejection threshold); small cells pooled.

    The threshold is the chi-square quantile at p = 1e-6 by the Wilson-Hilferty
    approximation (accurate to a few percent for df >= 10), so a correct sampler fails
    with negligible probability while real biases are far above it."""
    n = sum(counts.values())
    flat = probs.flatten()
    observed = torch.zeros_like(flat)
    for (a, b, c), k in counts.items():
        observed[a * VOCAB * VOCAB + b * VOCAB + c] = k
    impossible = observed[flat == 0].sum()
    assert impossible == 0, f"{int(impossible)} samples have probability 0 under the target (top-p violated)"
    expected = flat * n
    big = expected >= MIN_EXPECTED
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < MIN_EXPECTED:  # pool too small to stand alone: fold it into the smallest cell
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        i = int(torch.argmin(exp))
        obs[i] += observed[~big].sum()
        exp[i] += expected[~big].sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    h = 2.0 / (9.0 * df)
    threshold = df * (1.0 - h + Z_THRESHOLD * math.sqrt(h)) ** 3
    return stat, df, threshold


# kept to two cases (the target drafting for itself, full distribution; a different
# model drafting, top-p 0.8) so the module stays around 20-30 s on a shared 2-core machine
CASES = [
    ("self", SamplingConfig(temperature=1.0, top_p=1.0)),
    ("other", SamplingConfig(temperature=1.0, top_p=0.8)),
]


@pytest.fixture(scope="module")
def samples(target, other):
    """Seeded speculative samples of each case, drawn when a test first asks for that case
    (so that parallel workers each draw only the cases they run), shared by this module."""
    out: dict[int, Counter] = {}

    def draw(i: int) -> Counter:
        if i not in out:
            kind, sampling = CASES[i]
            drafter = LMDrafter(HFBackend(target if kind == "self" else other))
            accepted: Counter = Counter()
            out[i] = sample_counts(target, drafter, sampling, N_SAMPLES, seed0=10_000 * (i + 1), accepted=accepted)
            # the samples went through every acceptance outcome: 0, 1 and 2 drafted tokens
            assert all(accepted[a] >= 20 for a in range(SHAPE[0] + 1)), f"{kind}: acceptance outcomes {dict(accepted)}"
        return out[i]

    return draw


def test_target_is_not_degenerate(target):
    joint = exact_distribution(target, SamplingConfig(temperature=1.0))
    # enough sequences with real mass that a bias has somewhere to show
    assert int((joint * N_SAMPLES >= MIN_EXPECTED).sum()) >= 25
    assert float(joint.max()) < 0.2


@pytest.mark.slow  # thousands of sampled decodes: the full suite runs it, make test-fast does not
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{k}-T{s.temperature}-p{s.top_p}" for k, s in CASES])
def test_speculative_sampling_matches_target_distribution(target, samples, case):
    kind, sampling = CASES[case]
    stat, df, threshold = chi_square(samples(case), exact_distribution(target, sampling))
    assert stat < threshold, f"{kind} drafter, {sampling}: chi-square {stat:.1f} on {df} df exceeds {threshold:.1f}"


@pytest.mark.slow  # thousands of sampled decodes: the full suite runs it, make test-fast does not
def test_the_test_rejects_a_shifted_distribution(target, samples):
    """Correct samples against the distribution at temperature 0.8: must be rejected."""
    stat, df, threshold = chi_square(samples(0), exact_distribution(target, SamplingConfig(temperature=0.8)))
    assert stat > threshold, f"no power: chi-square {stat:.1f} on {df} df against a shifted distribution"


def _wrong_accept(tree, logits, sampling, generator=None) -> Accepted:
    """A classic bug: accept each drafted candidate with probability p(candidate), and on
    rejection sample from p itself instead of the residual distribution."""
    kids = tree.children()
    path, node = [0], 0
    while True:
        probs = target_probs(logits[node], sampling)
        match = None
        for c in kids[node]:
            if float(torch.rand((), generator=generator)) < float(probs[int(tree.tokens[c])]):
                match = c
                break
        if match is None:
            return Accepted(path=path, bonus=int(torch.multinomial(probs, 1, generator=generator)))
        path.append(match)
        node = match


@pytest.mark.slow  # thousands of sampled decodes: the full suite runs it, make test-fast does not
def test_the_test_rejects_a_wrong_acceptance_rule(target, monkeypatch):
    monkeypatch.setattr(ltd.cycle, "accept_tree", _wrong_accept)
    sampling = SamplingConfig(temperature=1.0)
    counts = sample_counts(target, LMDrafter(HFBackend(target)), sampling, N_POWER, seed0=777)
    stat, df, threshold = chi_square(counts, exact_distribution(target, sampling))
    assert stat > threshold, f"no power: the wrong rule passed with chi-square {stat:.1f} on {df} df (threshold {threshold:.1f})"


def test_same_seed_same_output(target, other):
    sampling = SamplingConfig(temperature=1.0)
    backend = HFBackend(target)
    drafter = LMDrafter(HFBackend(other))
    runs = [run_decode(backend, drafter, StaticController(*SHAPE), PROMPT, 12, sampling=sampling, seed=42)[0] for _ in range(2)]
    assert runs[0] == runs[1]
