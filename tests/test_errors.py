"""Bad input gives an LtdError with a helpful one-line message, never a traceback-worthy
exception from deep inside torch, transformers or safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_MAX_POS, make_tiny_head, make_tiny_llama
from ltd.control import MAX_DEPTH, MAX_SIZE, MAX_TOPK, StaticController, validate_static
from ltd.cycle import decode, start
from ltd.drafting.base import NullDrafter
from ltd.drafting.eagle3 import load_head, save_head
from ltd.engine import Engine, GenerateConfig, load_drafter
from ltd.errors import LtdError
from ltd.models import LoadedModel, encode_prompt, load_model, parse_dtype, resolve


def assert_one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    assert len(msg) < 400, f"message too long: {msg!r}"
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg!r}"
    return msg


@pytest.fixture
def engine(tiny_model) -> Engine:
    # no tokenizer needed: these paths fail before any tokenization
    return Engine(LoadedModel(name="tiny", model=tiny_model, tokenizer=None))


@pytest.fixture(scope="module")
def other_target() -> LoadedModel:
    """A target of another shape (hidden 32, vocabulary 128, 2 layers)."""
    return LoadedModel(name="other", model=make_tiny_llama(seed=3, vocab_size=128, hidden_size=32, num_layers=2), tokenizer=None)


# -- prompts and lengths -------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_prompt_encode(engine, text):
    with pytest.raises(LtdError) as exc:
        engine.encode(text)
    assert_one_line(exc, "empty")
    with pytest.raises(LtdError):
        encode_prompt(None, text)


def test_empty_prompt_cycle(tiny_backend):
    with pytest.raises(LtdError) as exc:
        start(tiny_backend, NullDrafter(), [])
    assert_one_line(exc, "empty")
    with pytest.raises(LtdError) as exc:
        next(decode(tiny_backend, NullDrafter(), StaticController(0, 1, 0), [], 4))
    assert_one_line(exc, "empty")


@pytest.mark.parametrize("method", ["hf", "ar"])
def test_empty_prompt_engine(engine, method):
    with pytest.raises(LtdError) as exc:
        engine.generate([], GenerateConfig(method=method, max_new_tokens=4))
    assert_one_line(exc, "empty")


def test_prompt_longer_than_context(tiny_backend, engine):
    long_prompt = [1] * (TINY_MAX_POS + 10)
    with pytest.raises(LtdError) as exc:
        start(tiny_backend, NullDrafter(), long_prompt)
    assert_one_line(exc, str(TINY_MAX_POS), str(len(long_prompt)))
    with pytest.raises(LtdError) as exc:
        start(tiny_backend, NullDrafter(), [1] * TINY_MAX_POS)  # no room left for one new token
    assert_one_line(exc, str(TINY_MAX_POS))
    with pytest.raises(LtdError) as exc:
        next(decode(tiny_backend, NullDrafter(), StaticController(0, 1, 0), long_prompt, 4))
    assert_one_line(exc, str(TINY_MAX_POS))
    for method in ("hf", "ar"):
        with pytest.raises(LtdError) as exc:
            engine.generate(long_prompt, GenerateConfig(method=method, max_new_tokens=4))
        assert_one_line(exc, str(TINY_MAX_POS))


def test_prompt_plus_new_tokens_longer_than_context(tiny_backend):
    with pytest.raises(LtdError) as exc:
        next(decode(tiny_backend, NullDrafter(), StaticController(0, 1, 0), [1] * 200, 100))
    assert_one_line(exc, "max-new-tokens", str(TINY_MAX_POS))


def test_backend_refuses_positions_past_the_context(tiny_backend):
    with pytest.raises(LtdError) as exc:
        tiny_backend.score([1] * (TINY_MAX_POS + 1), list(range(-1, TINY_MAX_POS)))
    assert_one_line(exc, str(TINY_MAX_POS))


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_not_positive(tiny_backend, engine, n):
    with pytest.raises(LtdError) as exc:
        next(decode(tiny_backend, NullDrafter(), StaticController(0, 1, 0), [1, 2], n))
    assert_one_line(exc, "max-new-tokens", str(n))
    with pytest.raises(LtdError) as exc:
        GenerateConfig(max_new_tokens=n).validate()
    assert_one_line(exc, "max-new-tokens")
    with pytest.raises(LtdError):
        engine.generate([1, 2], GenerateConfig(method="ar", max_new_tokens=n))


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth,topk,size,flag",
    [
        (-1, 8, 32, "--depth"),
        (MAX_DEPTH + 1, 8, 32, "--depth"),
        (5, 0, 32, "--topk"),
        (5, -2, 32, "--topk"),
        (5, MAX_TOPK + 1, 32, "--topk"),
        (5, 8, -1, "--size"),
        (5, 8, MAX_SIZE + 1, "--size"),
        (3, 8, 0, "--size"),
    ],
)
def test_static_settings_out_of_range(depth, topk, size, flag):
    with pytest.raises(LtdError) as exc:
        validate_static(depth, topk, size)
    assert_one_line(exc, flag)
    with pytest.raises(LtdError):
        StaticController(depth=depth, topk=topk, size=size)
    with pytest.raises(LtdError):
        GenerateConfig(depth=depth, topk=topk, size=size).validate()


@pytest.mark.parametrize("depth,topk,size", [(0, 1, 0), (MAX_DEPTH, MAX_TOPK, MAX_SIZE), (1, 1, 1)])
def test_static_settings_at_the_edges_are_fine(depth, topk, size):
    validate_static(depth, topk, size)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(method="beam"), "method"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
    ],
)
def test_generate_config_errors(kwargs, needle):
    with pytest.raises(LtdError) as exc:
        GenerateConfig(**kwargs).validate()
    assert_one_line(exc, needle)


def test_static_without_drafter(engine):
    with pytest.raises(LtdError) as exc:
        engine.generate([1, 2, 3], GenerateConfig(method="static", max_new_tokens=4))
    assert_one_line(exc, "drafter")


def test_unknown_head_dtype():
    from ltd.drafting.load import resolve_head_dtype

    with pytest.raises(LtdError) as exc:
        resolve_head_dtype("int4")
    assert_one_line(exc, "int4", "bfloat16")
    assert resolve_head_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_head_dtype("float32", "cpu") == torch.float32


def test_unknown_dtype():
    with pytest.raises(LtdError) as exc:
        parse_dtype("float8")
    assert_one_line(exc, "float8", "float32")


# -- models and paths ----------------------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(LtdError) as exc:
        resolve("no-such-model")
    assert_one_line(exc, "no-such-model", "smollm2-135m")
    with pytest.raises(LtdError):
        load_model("no-such-model")


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model-dir-xyz"])
def test_missing_model_path(name):
    with pytest.raises(LtdError) as exc:
        resolve(name)
    assert_one_line(exc, name)


def test_missing_gguf_file():
    with pytest.raises(LtdError) as exc:
        resolve("/no/such/dir/model.gguf")
    assert_one_line(exc, "model.gguf", "does not exist")


def test_model_dir_without_config(tmp_path):
    with pytest.raises(LtdError) as exc:
        resolve(str(tmp_path))
    assert_one_line(exc, "config.json")


def test_missing_drafter_path(other_target):
    with pytest.raises(LtdError) as exc:
        load_drafter("/no/such/drafter", other_target)
    assert_one_line(exc, "/no/such/drafter")
    with pytest.raises(LtdError) as exc:
        load_drafter("builtin:no-such-head", other_target)
    assert_one_line(exc, "no-such-head")


# -- EAGLE-3 checkpoints -------------------------------------------------------------------


@pytest.fixture
def head_dir(tmp_path, tiny_model) -> Path:
    """An EAGLE-3 head saved for the tiny target (hidden 48, vocabulary 96, 4 layers)."""
    d = tmp_path / "head"
    save_head(make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3]), d)
    return d


def test_head_round_trip_loads_for_its_target(head_dir, tiny_model):
    drafter = load_drafter(str(head_dir), LoadedModel(name="tiny", model=tiny_model, tokenizer=None))
    assert drafter.feature_layers == [1, 2, 3]


def test_head_for_another_target_is_refused(head_dir, other_target):
    with pytest.raises(LtdError) as exc:
        load_drafter(str(head_dir), other_target)
    msg = assert_one_line(exc, str(head_dir))
    for number in ("48", "96", "32", "128"):  # both hidden sizes, both vocabularies
        assert number in msg, f"{number} missing from {msg!r}"


def test_head_reading_layers_the_target_lacks(head_dir, tiny_model):
    # same hidden size and vocabulary, but only 2 layers: layer id 3 does not exist
    small = make_tiny_llama(seed=4, num_layers=2)
    with pytest.raises(LtdError) as exc:
        load_drafter(str(head_dir), LoadedModel(name="small", model=small, tokenizer=None))
    assert_one_line(exc, "[3]", "2 layers")


@pytest.mark.parametrize(
    "corruption",
    ["garbage", "truncated", "empty"],
)
def test_corrupt_safetensors(head_dir, tiny_model, corruption):
    weights = head_dir / "model.safetensors"
    data = weights.read_bytes()
    if corruption == "garbage":
        weights.write_bytes(b"this is not a safetensors file" * 10)
    elif corruption == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"")
    target = LoadedModel(name="tiny", model=tiny_model, tokenizer=None)
    with pytest.raises(LtdError) as exc:
        load_drafter(str(head_dir), target)
    assert_one_line(exc, str(head_dir))
    with pytest.raises(LtdError):
        load_head(head_dir)


def test_corrupt_head_config_json(head_dir, tiny_model):
    (head_dir / "config.json").write_text("{not json")
    with pytest.raises(LtdError) as exc:
        load_drafter(str(head_dir), LoadedModel(name="tiny", model=tiny_model, tokenizer=None))
    assert_one_line(exc, "json")


def test_head_config_missing_fields(head_dir):
    cfg = json.loads((head_dir / "config.json").read_text())
    del cfg["hidden_size"]
    (head_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LtdError) as exc:
        load_head(head_dir)
    assert_one_line(exc, "hidden_size")


def test_head_weights_missing(head_dir):
    (head_dir / "model.safetensors").unlink()
    with pytest.raises(LtdError) as exc:
        load_head(head_dir)
    assert_one_line(exc, "model.safetensors")


def test_head_weights_that_do_not_match_the_config(head_dir, tmp_path, other_target):
    """Weights of a head for another target under this config: refused, one line."""
    other_dir = tmp_path / "other_head"
    save_head(make_tiny_head(other_target.model, draft_vocab_size=64, layer_ids=[0, 1, 2]), other_dir)
    (head_dir / "model.safetensors").write_bytes((other_dir / "model.safetensors").read_bytes())
    with pytest.raises(LtdError) as exc:
        load_head(head_dir)
    assert_one_line(exc, "does not match")


def test_saved_head_round_trips_exactly(head_dir, tiny_model):
    """Sanity for the fixtures above: what is saved (fp16) is what loads."""
    head = load_head(head_dir)
    again = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3])
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b.to(torch.float16).float(), msg=name)
        else:
            assert torch.equal(a, b), name
