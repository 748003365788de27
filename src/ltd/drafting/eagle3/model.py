"""EAGLE-3 style draft head: one decoder layer over fused target features.

Layout follows the standard EAGLE-3 checkpoint (``LlamaForCausalLMEagle3`` as read by
EAGLE, SpecForge and llama.cpp's converter): ``fc`` fuses the target's low, middle and
high layer features, ``midlayer`` is one Llama decoder layer whose attention reads
``concat(norm(embed(token)), hidden_norm(hidden))``, ``norm`` + ``lm_head`` score a
reduced draft vocabulary, and ``d2t`` maps draft ids to target ids
(``target = draft + d2t[draft]``). Token embeddings are the target's own (frozen), so the
shipped checkpoint stays small.

Alignment: the head's entry t reads the target feature h_t (the target after processing
x_t) and the embedding of x_{t+1}, and predicts x_{t+2}; it sits at position t. Drafting
deeper, a node's entry reads its parent's output hidden instead of h_t.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ltd.errors import LtdError


@dataclass
class Eagle3Config:
    """Shape of an EAGLE-3 head; JSON keys follow the standard EAGLE-3 config."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # target vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    eagle_aux_hidden_state_layer_ids: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    norm_before_residual: bool = False

    @staticmethod
    def default_layer_ids(num_layers: int) -> list[int]:
        """EAGLE-3's low/middle/high choice: [2, n//2, n-3]."""
        return [2, num_layers // 2, num_layers - 3]

    @staticmethod
    def for_target(target_config, draft_vocab_size: int, intermediate_size: int | None = None) -> "Eagle3Config":
        """A head shaped to sit on a given target model config."""
        h = int(target_config.hidden_size)
        heads = int(target_config.num_attention_heads)
        return Eagle3Config(
            hidden_size=h,
            intermediate_size=int(intermediate_size or target_config.intermediate_size),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(target_config, "num_key_value_heads", heads) or heads),
            head_dim=int(getattr(target_config, "head_dim", None) or h // heads),
            vocab_size=int(target_config.vocab_size),
            draft_vocab_size=int(min(draft_vocab_size, target_config.vocab_size)),
            target_hidden_size=h,
            eagle_aux_hidden_state_layer_ids=Eagle3Config.default_layer_ids(int(target_config.num_hidden_layers)),
            rms_norm_eps=float(getattr(target_config, "rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(target_config),
            max_position_embeddings=int(getattr(target_config, "max_position_embeddings", 8192)),
        )

    def to_json_dict(self) -> dict:
        """The config as written to disk, in the standard EAGLE-3 layout."""
        d = asdict(self)
        d.update(
            architectures=["LlamaForCausalLMEagle3"],
            model_type="llama",
            num_hidden_layers=1,
            hidden_act="silu",
            tie_word_embeddings=False,
            eagle_config={"eagle_aux_hidden_state_layer_ids": list(self.eagle_aux_hidden_state_layer_ids)},
        )
        return d

    @staticmethod
    def from_json_dict(d: dict) -> "Eagle3Config":
        """Read our own config or a standard EAGLE-3 export (EAGLE/SpecForge layout, or
        vLLM speculators' ``Eagle3Speculator`` with the layer under ``transformer_layer_config``)."""
        if isinstance(d.get("transformer_layer_config"), dict):
            d = {**d["transformer_layer_config"], **{k: v for k, v in d.items() if k != "transformer_layer_config"}}
        names = set(Eagle3Config.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        if not kw.get("eagle_aux_hidden_state_layer_ids"):
            kw["eagle_aux_hidden_state_layer_ids"] = list(
                (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids", [])
            )
        if "rope_theta" not in kw and isinstance(d.get("rope_parameters"), dict):
            kw["rope_theta"] = float(d["rope_parameters"].get("rope_theta", 10000.0))
        kw.setdefault("target_hidden_size", d.get("hidden_size"))
        kw.setdefault("draft_vocab_size", d.get("vocab_size"))
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in kw]
        if missing:
            raise LtdError(f"drafter config lacks {', '.join(missing)}; is this an EAGLE-3 head directory?")
        kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
        return Eagle3Config(**kw)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Llama attention whose q/k/v read a 2*hidden input (embedding ++ hidden)."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        h2 = 2 * cfg.hidden_size
        self.q_proj = nn.Linear(h2, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(h2, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(h2, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, 2H]; positions: [B, T]; allowed: bool [B, T, P+T]; past: [B, kvh, P, hd]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(x.device)  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype).unsqueeze(1), emb.sin().to(x.dtype).unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past_k is not None:
            k_all = torch.cat([past_k, k], dim=2)
            v_all = torch.cat([past_v, v], dim=2)
        else:
            k_all, v_all = k, v
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        ka = k_all.repeat_interleave(rep, dim=1) if rep > 1 else k_all
        va = v_all.repeat_interleave(rep, dim=1) if rep > 1 else v_all
        out = F.scaled_dot_product_attention(q, ka, va, attn_mask=allowed.unsqueeze(1))
        out = out.transpose(1, 2).reshape(b, t, cfg.num_attention_heads * cfg.head_dim)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    """The EAGLE-3 decoder layer."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, emb, hidden, positions, allowed, past_k, past_v):
        normed = self.hidden_norm(hidden)
        residual = normed if self.cfg.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(emb), normed], dim=-1)
        attn, k, v = self.self_attn(x, positions, allowed, past_k, past_v)
        h = residual + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v


class Eagle3Head(nn.Module):
    """Weights of an EAGLE-3 head (embeddings excluded: they are the target's)."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.config = cfg
        n_feat = len(cfg.eagle_aux_hidden_state_layer_ids) or 3
        self.fc = nn.Linear(n_feat * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    def set_vocab_map(self, draft_to_target: torch.Tensor) -> None:
        """Set d2t/t2d from the sorted list of target ids in the draft vocabulary."""
        ids = draft_to_target.to(torch.long)
        if ids.numel() != self.config.draft_vocab_size:
            raise ValueError("draft vocabulary size mismatch")
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self.t2d.zero_()
        self.t2d[ids] = True

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def vocab_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(target id of every draft id, draft id of every target id or -1), on the CPU."""
        n = self.config.draft_vocab_size
        d2t = self.draft_to_target(torch.arange(n, device=self.d2t.device)).cpu()
        t2d = torch.full((self.config.vocab_size,), -1, dtype=torch.long)
        t2d[d2t] = torch.arange(n)
        return d2t, t2d

    def forward(
        self,
        hidden: torch.Tensor,
        emb: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
        fuse: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer pass. ``fuse`` applies ``fc`` to target features (else ``hidden``
        is already a head output). Returns (output hidden, new keys, new values)."""
        if fuse:
            hidden = self.fc(hidden)
        return self.midlayer(emb, hidden, positions, allowed, past_k, past_v)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def init_random_head(cfg: Eagle3Config, seed: int = 0, draft_ids: torch.Tensor | None = None) -> Eagle3Head:
    """A randomly initialised head (tests, and the starting point of training)."""
    g = torch.Generator().manual_seed(seed)
    head = Eagle3Head(cfg)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1])))
    if draft_ids is None:
        draft_ids = torch.arange(cfg.draft_vocab_size)
    head.set_vocab_map(draft_ids)
    return head
