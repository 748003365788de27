"""EAGLE-3 export in the standard layout: keys, dtypes, round trip, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import TINY_VOCAB, make_tiny_head, make_tiny_llama
from ltd.drafting.eagle3 import Eagle3Head, load_head, save_head
from ltd.drafting.export import TARGET_SUBDIR, export_drafter, write_export
from ltd.errors import LtdError

REQUIRED_CONFIG_KEYS = (
    "architectures", "num_hidden_layers", "draft_vocab_size", "vocab_size", "target_hidden_size",
    "eagle_aux_hidden_state_layer_ids", "eagle_config", "norm_before_residual", "norm_before_fc",
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
)


def tiny_tokenizer():
    """A real fast tokenizer over the tiny vocabulary (save_pretrained writes its files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


@pytest.fixture(scope="module")
def tiny():
    target = make_tiny_llama(seed=3)
    head = make_tiny_head(target, draft_vocab_size=40, layer_ids=[0, 2, 3], seed=3)
    return target, head


def _logits(head: Eagle3Head, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Head output and draft logits on fixed random features (causal, 5 positions)."""
    cfg = head.config
    g = torch.Generator().manual_seed(seed)
    n = 5
    feats = torch.randn(1, n, 3 * cfg.target_hidden_size, generator=g)
    emb = torch.randn(1, n, cfg.hidden_size, generator=g)
    pos = torch.arange(n).unsqueeze(0)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)).unsqueeze(0)
    with torch.no_grad():
        out, _, _ = head(feats, emb, pos, allowed)
        return out, head.logits(out)


def test_export_round_trip_gives_identical_logits(tmp_path, tiny):
    target, head = tiny
    res = write_export(head, target.get_input_embeddings().weight, target.config, tiny_tokenizer(), tmp_path / "exp",
                       dtype=torch.float32)
    loaded = load_head(res.head_dir)
    for a, b in zip(_logits(head), _logits(loaded)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
    assert loaded.config.eagle_aux_hidden_state_layer_ids == [0, 2, 3]


def test_fp16_export_round_trip_matches_fp16_head(tmp_path, tiny):
    target, head = tiny
    write_export(head, target.get_input_embeddings().weight, target.config, tiny_tokenizer(), tmp_path / "exp")
    loaded = load_head(tmp_path / "exp")
    rounded = Eagle3Head(head.config)
    rounded.load_state_dict({k: (v.half().float() if v.is_floating_point() else v) for k, v in head.state_dict().items()})
    for a, b in zip(_logits(rounded), _logits(loaded)):
        assert torch.equal(a, b)


def test_export_has_every_standard_key_and_dtype(tmp_path, tiny):
    target, head = tiny
    res = write_export(head, target.get_input_embeddings().weight, target.config, tiny_tokenizer(), tmp_path / "exp")
    cfg = json.loads((res.head_dir / "config.json").read_text())
    for key in REQUIRED_CONFIG_KEYS:
        assert key in cfg, key
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["num_hidden_layers"] == 1
    assert cfg["vocab_size"] >= target.config.vocab_size
    assert cfg["draft_vocab_size"] == 40
    assert cfg["target_hidden_size"] == target.config.hidden_size
    assert cfg["eagle_aux_hidden_state_layer_ids"] == cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
    assert cfg["norm_before_residual"] is False and cfg["norm_before_fc"] is False
    with safe_open(str(res.head_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
        assert f.get_tensor("embed_tokens.weight").shape == (TINY_VOCAB, target.config.hidden_size)
        assert f.get_tensor("lm_head.weight").shape[0] == 40
        assert f.get_tensor("fc.weight").shape[1] == 3 * target.config.hidden_size
    for name in ("fc.weight", "norm.weight", "lm_head.weight", "embed_tokens.weight", "d2t", "t2d",
                 "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "midlayer.self_attn.q_proj.weight",
                 "midlayer.mlp.down_proj.weight", "midlayer.post_attention_layernorm.weight"):
        assert name in names, name
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert t2d.shape == (TINY_VOCAB,) and int(t2d.sum()) == 40
    ids = torch.arange(40) + d2t  # target = draft + d2t[draft]
    assert torch.equal(torch.nonzero(t2d).flatten(), torch.sort(ids).values)
    tdir = res.head_dir / TARGET_SUBDIR
    assert json.loads((tdir / "config.json").read_text())["vocab_size"] == TINY_VOCAB
    assert (tdir / "tokenizer.json").is_file()


def test_export_to_separate_target_dir(tmp_path, tiny):
    target, head = tiny
    res = write_export(head, target.get_input_embeddings().weight, target.config, tiny_tokenizer(), tmp_path / "exp",
                       target_dir=tmp_path / "tgt")
    assert res.target_dir == tmp_path / "tgt"
    assert (tmp_path / "tgt" / "config.json").is_file()
    assert not (tmp_path / "exp" / TARGET_SUBDIR).exists()


def test_export_refuses_head_of_another_target(tmp_path, tiny):
    _, head = tiny
    other = make_tiny_llama(seed=1, hidden_size=32, num_heads=4, num_kv_heads=2)
    with pytest.raises(LtdError) as err:
        write_export(head, other.get_input_embeddings().weight, other.config, tiny_tokenizer(), tmp_path / "exp")
    assert "\n" not in str(err.value) and "hidden size" in str(err.value)
    assert not (tmp_path / "exp").exists()


def test_export_refuses_corrupt_vocab_map(tmp_path, tiny):
    target, head = tiny
    bad = Eagle3Head(head.config)
    bad.load_state_dict(head.state_dict())
    bad.d2t.zero_()
    bad.d2t[1] = -1  # draft ids 0 and 1 both map to target id 0
    with pytest.raises(LtdError, match="duplicate target ids"):
        write_export(bad, target.get_input_embeddings().weight, target.config, tiny_tokenizer(), tmp_path / "exp")


def test_export_drafter_corrupt_checkpoint_is_one_line(tmp_path, tiny):
    _, head = tiny
    save_head(head, tmp_path / "head")
    (tmp_path / "head" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LtdError) as err:
        export_drafter(str(tmp_path / "head"), "smollm2-135m", tmp_path / "exp")
    assert "corrupt drafter checkpoint" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(LtdError, match="neither builtin"):
        export_drafter(str(tmp_path / "nowhere"), "smollm2-135m", tmp_path / "exp")
    with pytest.raises(LtdError, match="no built-in drafter"):
        export_drafter("builtin:nope", "smollm2-135m", tmp_path / "exp")
    with pytest.raises(LtdError, match="unknown export format"):
        export_drafter("builtin:nope", "smollm2-135m", tmp_path / "exp", fmt="medusa")


def test_shipped_head_exports_in_standard_layout(tmp_path):
    """The shipped SmolLM2 head, with stand-in embeddings of the target's shape (no model load)."""
    from transformers import LlamaConfig

    from ltd.drafting.eagle3 import builtin_drafter_dir

    head = load_head(builtin_drafter_dir("smollm2-135m-eagle3"))
    cfg = head.config
    target_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.target_hidden_size, num_hidden_layers=30,
                             num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size)
    embed = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    write_export(head, embed, target_cfg, tiny_tokenizer(), tmp_path / "exp")
    loaded = load_head(tmp_path / "exp")
    for a, b in zip(_logits(head), _logits(loaded)):  # the shipped weights are fp16 already: exact
        assert torch.equal(a, b)
    with safe_open(str(tmp_path / "exp" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
        assert f.get_tensor("lm_head.weight").shape == (cfg.draft_vocab_size, cfg.hidden_size)


def test_shipped_head_fits_the_size_budget():
    """The repository ships the SmolLM2 head in half precision under 25 MB."""
    from ltd.drafting.eagle3 import builtin_drafter_dir

    weights = builtin_drafter_dir("smollm2-135m-eagle3") / "model.safetensors"
    assert weights.stat().st_size < 25_000_000
    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype in (torch.float16, torch.bfloat16)


def test_loader_reads_speculators_nesting(tmp_path, tiny):
    """vLLM speculators nest the layer config and name the layer ``layers.0.*``."""
    from safetensors.torch import load_file, save_file

    target, head = tiny
    write_export(head, target.get_input_embeddings().weight, target.config, tiny_tokenizer(), tmp_path / "exp",
                 dtype=torch.float32)
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    layer_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "rms_norm_eps", "rope_theta", "max_position_embeddings")
    nested = {k: v for k, v in cfg.items() if k not in layer_keys}
    nested["transformer_layer_config"] = {k: cfg[k] for k in layer_keys}
    nested["architectures"] = ["Eagle3Speculator"]
    (tmp_path / "exp" / "config.json").write_text(json.dumps(nested))
    state = load_file(str(tmp_path / "exp" / "model.safetensors"))
    state = {k.replace("midlayer.", "layers.0."): v for k, v in state.items()}
    save_file(state, str(tmp_path / "exp" / "model.safetensors"))
    loaded = load_head(tmp_path / "exp")
    for a, b in zip(_logits(head), _logits(loaded)):
        assert torch.equal(a, b)
