"""The llama.cpp backend on the embedded SmolLM2 GGUF.

Tree logits must equal sequential decoding of each root path, commit/rollback must leave
the cache exactly as sequential decoding would, and greedy speculative decoding must
emit llama.cpp's own plain greedy output token for token, for every drafter. Skipped
when llama-cpp-python or the weights package is not installed.
"""

from __future__ import annotations

import builtins
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from conftest import first_difference, run_decode, run_general_stages
from ltd.control import StaticController
from ltd.drafting.base import NullDrafter
from ltd.drafting.lm import LMDrafter
from ltd.drafting.ngram import NgramDrafter
from ltd.errors import LtdError

# every test here runs the embedded GGUF on llama.cpp
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")]

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198]  # a short chat-shaped prompt
TIE = 1e-4  # a top-2 margin below this is a numerical tie (docs/design.md)


@pytest.fixture(scope="module")
def gguf():
    from ltd.models import registry_gguf
    from ltd.registry import REGISTRY

    try:
        return registry_gguf(REGISTRY["smollm2-135m"])
    except LtdError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def lmodel(gguf):
    from ltd.backends.llamacpp import LlamaCppModel

    return LlamaCppModel(gguf)


def new_backend(lmodel, **kw):
    from ltd.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(lmodel, threads=1, max_context=kw.pop("max_context", 512), **kw)


@pytest.fixture(scope="module")
def backend(lmodel):
    return new_backend(lmodel)


@pytest.fixture(scope="module")
def reference(lmodel):
    """A second context, used only for sequential (chain) decoding."""
    return new_backend(lmodel)


def chain_logits(b, tokens):
    """Logits after each token of ``tokens``, decoded as one plain chain from scratch.

    llama.cpp's kernels give the same logits for a token whatever the size of its batch,
    as long as the batch has two or more tokens; a one-token batch takes another path
    (logits differ by up to ~0.7 on SmolLM2 Q4_1). So these comparisons always score at
    least two tokens, or compare a one-token batch with a one-token batch.
    """
    b.reset()
    out = b.score(tokens, list(range(-1, len(tokens) - 1))).logits
    b.reset()
    return out


def test_sizes(backend):
    assert backend.vocab_size == 49152
    assert backend.num_layers == 30 and backend.hidden_size == 576


def test_tree_logits_equal_sequential_decoding(backend, reference):
    # root A with children B, C; B has child D; C has children E, F; E has child G
    tokens = [260, 3525, 314, 2683, 359, 1115, 30]
    parents = [-1, 0, 0, 1, 2, 2, 4]
    backend.reset()
    backend.score(PROMPT, list(range(-1, len(PROMPT) - 1)))
    backend.commit(list(range(len(PROMPT))))
    tree = backend.score(tokens, parents).logits
    backend.rollback()
    for node in range(len(tokens)):
        path = []
        n = node
        while n >= 0:
            path.append(tokens[n])
            n = parents[n]
        want = chain_logits(reference, PROMPT + path[::-1])[-1]
        diff = float((tree[node] - want).abs().max())
        assert diff == 0.0, f"node {node}: max |tree - sequential| = {diff}"


def test_incremental_levels_equal_one_batch(backend):
    """Scoring a tree level by level (as a drafter does) gives the one-batch logits."""
    tokens = [260, 3525, 314, 2683, 359, 1115, 30]
    parents = [-1, -1, 0, 0, 1, 3, 3]
    backend.reset()
    backend.score(PROMPT, list(range(-1, len(PROMPT) - 1)))
    backend.commit(list(range(len(PROMPT))))
    scored = backend.score(tokens, parents)
    whole = scored.logits
    assert scored.exact is not None and bool(scored.exact[0])
    backend.rollback()
    pieces = [backend.score(tokens[lo:hi], parents[lo:hi]).logits for lo, hi in [(0, 2), (2, 4), (4, 5), (5, 7)]]
    backend.rollback()
    got = torch.cat(pieces)
    # Nodes on the first-child chain sit in sequential decoding's cells in both scorings
    # and are bit-identical (both are marked exact: node 0 here). Other nodes attend over
    # other cells in the two scorings and may round differently (module docstring of
    # ltd.backends.llamacpp: 0.4-1.0 logits; equal on AVX2, 0.39 for node 2 on AVX-512),
    # but a wrong tree mask changes them by far more.
    assert float((got[0] - whole[0]).abs().max()) == 0.0
    assert float((got - whole).abs().max()) < 1.0


@pytest.mark.parametrize("keep_leaf", [3, 6, 5])
def test_commit_leaves_the_cache_as_sequential_decoding(backend, reference, keep_leaf):
    tokens = [260, 3525, 314, 2683, 359, 1115, 30]
    parents = [-1, 0, 0, 1, 2, 2, 4]
    backend.reset()
    backend.score(PROMPT, list(range(-1, len(PROMPT) - 1)))
    backend.commit(list(range(len(PROMPT))))
    backend.score(tokens, parents)
    path = []
    n = keep_leaf
    while n >= 0:
        path.append(n)
        n = parents[n]
    path = path[::-1]
    backend.commit(path)
    assert backend.committed_length == len(PROMPT) + len(path)
    assert backend.speculative_length == 0
    nxt = [42, 7]
    got = backend.score(nxt, [-1, 0]).logits
    backend.rollback()
    want = chain_logits(reference, PROMPT + [tokens[i] for i in path] + nxt)[-2:]
    assert float((got - want).abs().max()) == 0.0
    # after a rollback the same continuation scores the same again
    again = backend.score(nxt, [-1, 0]).logits
    backend.rollback()
    assert float((again - got).abs().max()) < 1e-5


def test_empty_commit_and_rollback_keep_the_context(backend, reference):
    backend.reset()
    backend.score(PROMPT, list(range(-1, len(PROMPT) - 1)))
    backend.commit(list(range(len(PROMPT))))
    backend.score([10, 11, 12], [-1, -1, 1])
    backend.commit([])
    backend.score([13], [-1])
    backend.rollback()
    got = backend.score([14], [-1]).logits
    backend.rollback()
    reference.reset()
    reference.score(PROMPT, list(range(-1, len(PROMPT) - 1)))
    reference.commit(list(range(len(PROMPT))))
    want = reference.score([14], [-1]).logits  # a one-token batch, like ``got``
    reference.reset()
    assert float((got - want).abs().max()) == 0.0


def test_bad_commits_are_refused(backend):
    backend.reset()
    backend.score([10, 11], [-1, -1])
    with pytest.raises(ValueError):
        backend.commit([1, 0])
    with pytest.raises(ValueError):
        backend.commit([5])
    backend.rollback()


def test_features_are_refused_with_the_alternatives(backend):
    backend.reset()
    with pytest.raises(LtdError, match="ngram"):
        backend.score([10], [-1], feature_layers=[1, 2])


def _greedy_reference(backend, prompt, n):
    return backend.greedy_generate(prompt, n)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 4), (4, 4, 10)])
def test_greedy_is_lossless_with_every_drafter(lmodel, backend, shape):
    """The keystone on this backend: ar and static equal llama.cpp's plain greedy loop."""
    prompt = PROMPT + [504, 3525, 314, 2683, 359, 504, 3525, 314]
    n = 24
    ref = _greedy_reference(backend, prompt, n)
    d, k, v = shape
    drafters = {
        "none": (NullDrafter(), StaticController(depth=0, topk=1, size=0)),
        "ngram": (NgramDrafter(), StaticController(depth=d, topk=k, size=v)),
        "self": (LMDrafter(new_backend(lmodel)), StaticController(depth=d, topk=k, size=v)),
    }
    for name, (drafter, ctrl) in drafters.items():
        got, results = run_decode(backend, drafter, ctrl, prompt, n, topk=max(k, 1))
        pos = first_difference(got, ref)
        if pos is not None:
            ctx = prompt + ref[:pos]
            logits = backend.score(ctx, list(range(-1, len(ctx) - 1))).logits[-1]
            backend.reset()
            margin = float(torch.topk(logits, 2).values.diff().abs())
            assert name != "none", f"ar differs from the plain loop at {pos}: a bug (both decode one token at a time)"
            # a near-tie with stock kernels, whose logits depend on the batch size (README
            # "Batch-size numerics"); with exact kernels the backend's margin is 1e-4
            assert margin < backend.tie_margin, f"{name} {shape}: differs at {pos} with reference top-2 margin {margin:.3g}"
        if name == "self":
            assert sum(r.num_accepted for r in results[1:]) > 0  # the target drafting for itself is accepted


def test_root_alone_is_plain_decoding(backend, monkeypatch):
    """A cycle with nothing drafted decodes the root straight onto the context
    (``score_next``): ``ar`` equals llama.cpp's plain loop and the general cycle stages
    token for token, and nothing but the prefill goes through ``score``."""
    prompt = PROMPT + [504, 3525, 314]
    n = 32
    ref = backend.greedy_generate(prompt, n)
    calls = []
    real_score = backend.score
    monkeypatch.setattr(backend, "score", lambda *a, **kw: calls.append(1) or real_score(*a, **kw))
    got, results = run_decode(backend, NullDrafter(), StaticController(depth=0, topk=1, size=0), prompt, n, topk=1)
    monkeypatch.undo()
    assert got == ref
    assert len(calls) == 1  # the prefill: every cycle took the root-only path
    assert run_general_stages(backend, prompt, n) == ref
    backend.reset()


def test_root_on_the_context_commits_and_rolls_back(backend):
    """After ``score_next`` the root is speculative: an empty commit or a rollback drops it,
    a commit keeps it, and a later tree after it is scored on a path sequence."""
    prompt = PROMPT + [504]
    ref = backend.greedy_generate(prompt, 3)
    backend.score(prompt, list(range(-1, len(prompt) - 1)))
    backend.commit(list(range(len(prompt))))
    first = backend.score_next(ref[0])
    backend.commit([])
    assert backend.score_next(ref[0]) == first == ref[1]
    backend.rollback()
    assert (backend.committed_length, backend.speculative_length) == (len(prompt), 0)
    assert backend.score_next(ref[0]) == ref[1]
    assert backend.speculative_length == 1
    out = backend.score([ref[1], 42], [0, 0])  # a tree after the lone root
    assert int(out.logits[0].argmax()) == ref[2]
    backend.commit([0, 1])
    assert backend.committed_length == len(prompt) + 2 and backend.speculative_length == 0
    backend.reset()


def test_engine_on_llamacpp_matches_its_reference():
    from ltd.engine import Engine, GenerateConfig

    engine = Engine.load("smollm2-135m", drafter="ngram", backend="llamacpp", threads=1)
    assert engine.target.model is None  # no dense weights were loaded
    prompt = engine.encode("Repeat after me: one two three, one two three, one two three.")
    ref = engine.generate(prompt, GenerateConfig(method="llama.cpp", max_new_tokens=16))
    for method in ("ar", "static", "ltd"):  # ltd: the policies shipped for this backend
        res = engine.generate(prompt, GenerateConfig(method=method, max_new_tokens=16, depth=4, topk=2, size=4))
        assert res.tokens == ref.tokens, method
    with pytest.raises(LtdError, match="llama.cpp"):
        engine.generate(prompt, GenerateConfig(method="hf", max_new_tokens=4))
    with pytest.raises(LtdError, match="--backend hf"):
        Engine.load("smollm2-135m", drafter="builtin:smollm2-135m-eagle3", backend="llamacpp", threads=1)


def test_llamacpp_engine_tokenizes_prompts_like_llama_cpp(lmodel):
    """On llama.cpp prompts are tokenized by llama.cpp, as its own tools do: HF's tokenizer
    splits a newline, four spaces and a digit (humaneval/6) into other tokens."""
    from ltd.engine import Engine
    from ltd.models import encode_prompt

    engine = Engine.load("smollm2-135m", drafter="ngram", backend="llamacpp", threads=1)
    text = "def f(x):\n    5 + x"
    tok = engine.target.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    ids = engine.encode(text)
    assert ids == lmodel.tokenize(rendered)
    hf_ids = encode_prompt(tok, text)
    assert hf_ids != ids  # the case this exists for: the two tokenizers disagree here
    assert tok.decode(ids) == tok.decode(hf_ids) == rendered
    assert engine.encode(text, chat=False) == lmodel.tokenize(text)
    assert engine.encode_messages([{"role": "user", "content": text}]) == ids


def test_peer_output_text_is_tokenized_by_llama_cpp(lmodel):
    """A peer tool prints text; its ids come from llama.cpp's tokenizer, which keeps the
    newline pair that SmolLM2 generates as one token where HF's tokenizer makes two."""
    from ltd.models import load_tokenizer_only
    from ltd.peers.llamacpp_peer import output_tokens
    from ltd.peers.llamacpp_spec import ToolRun

    tok, _ = load_tokenizer_only("smollm2-135m", lmodel.path)
    run = ToolRun(text="the product:\n\n1. Eco", n_predict=64, seconds=1.0)
    ours = output_tokens(tok, run, 64, [2], lmodel.tokenize)
    assert tok.convert_ids_to_tokens(ours[3:5]) == ["ĊĊ", "1"]
    assert tok.decode(ours[:-1]) == run.text and ours[-1] == 2  # stopped early: the end token is put back
    hf = output_tokens(tok, run, 64, [2])
    assert hf != ours


def test_each_backend_has_its_own_shipped_policies():
    """Policies learn one backend's costs and drafter: llama.cpp's are not the hf backend's."""
    from ltd.engine import default_policy_dir

    hf, lcp = default_policy_dir("smollm2-135m"), default_policy_dir("smollm2-135m", "llamacpp")
    assert hf != lcp
    for d in (hf, lcp):
        assert (d / "depth" / "policy.json").is_file() and (d / "size" / "policy.json").is_file()


@pytest.mark.parametrize("env, llamafile, expected", [
    (None, False, True),   # the build setup.sh makes: exact by default
    (None, True, False),   # pip's stock build: batch-size-dependent kernels, exactness impossible
    ("0", False, False),   # opted out for faster batches
    ("1", True, True),     # forced (the backend still reports inexact kernels, see tie_margin)
    ("", False, True),
])
def test_exact_mode_follows_the_build_unless_the_environment_says(monkeypatch, env, llamafile, expected):
    from ltd.backends.llamacpp import exact_kernels

    if env is None:
        monkeypatch.delenv("LTD_LLAMACPP_EXACT", raising=False)
    else:
        monkeypatch.setenv("LTD_LLAMACPP_EXACT", env)
    info = b"CPU : AVX2 = 1 | " + (b"LLAMAFILE = 1 | " if llamafile else b"") + b"REPACK = 1 |"
    fake = SimpleNamespace(llama_print_system_info=lambda: info)
    assert exact_kernels(fake) is expected
    assert exact_kernels() is (env not in (None, "", "0"))  # without the module only the environment counts


def test_missing_bindings_are_a_one_line_error(monkeypatch):
    from ltd.backends import llamacpp

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(LtdError, match=r"pip install 'ltd\[llamacpp\]'") as err:
        llamacpp.import_llama_cpp()
    assert "\n" not in str(err.value)


def test_corrupt_gguf_is_a_one_line_error(tmp_path):
    from ltd.backends.llamacpp import LlamaCppModel

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(LtdError, match="re-download") as err:
        LlamaCppModel(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(LtdError, match="does not exist"):
        LlamaCppModel(tmp_path / "missing.gguf")


def test_server_on_llamacpp_streams_the_engine_output():
    """``ltd serve --backend llamacpp``: streamed and whole answers equal Engine.generate."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from ltd.engine import Engine, GenerateConfig
    from ltd.serve.app import create_app
    from ltd.serve.background import BackgroundServer
    from ltd.serve.settings import ServeSettings

    engine = Engine.load("smollm2-135m", drafter="ngram", backend="llamacpp", threads=1)
    tree = dict(depth=3, topk=2, size=4)
    prompt = "Say hello twice."
    ref = engine.generate(engine.encode(prompt), GenerateConfig(method="static", max_new_tokens=12, **tree))
    srv = BackgroundServer(create_app(engine, ServeSettings(model_name="m", method="static", **tree))).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": prompt}]
        full = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0)
        assert full.choices[0].message.content == ref.text
        chunks = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    finally:
        srv.stop()
