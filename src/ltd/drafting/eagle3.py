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

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ltd.errors import LtdError
from ltd.fileio import atomic_write
from ltd.tree import Tree, ancestor_mask

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Write config.json + model.safetensors atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in self.state_dict().items()
        }
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        text = json.dumps(self.config.to_json_dict(), indent=2)
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))

    @staticmethod
    def load(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "Eagle3Head":
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise LtdError(f"no EAGLE-3 head in {directory}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            cfg = Eagle3Config.from_json_dict(json.loads(cfg_path.read_text()))
            state = load_file(str(w_path))
        except (json.JSONDecodeError, OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise LtdError(f"corrupt drafter checkpoint in {directory} ({exc}); retrain or re-download it") from None
        state = {k.replace("layers.0.", "midlayer."): v for k, v in state.items()}
        state.pop("embed_tokens.weight", None)
        head = Eagle3Head(cfg)
        if "d2t" not in state:  # full-vocabulary head
            state["d2t"] = torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
            state["t2d"] = torch.ones(cfg.vocab_size, dtype=torch.bool)
        state["d2t"] = state["d2t"].to(torch.long)  # exports store int64; older files any int type
        state["t2d"] = state["t2d"].to(torch.bool)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise LtdError(f"drafter checkpoint in {directory} does not match its config: {first}") from None
        return head.to(device=device, dtype=dtype)


def check_head_matches_target(cfg: Eagle3Config, target_config, where: str) -> None:
    """Refuse a head built for another target, naming both shapes."""
    th, tv = int(target_config.hidden_size), int(target_config.vocab_size)
    n = int(target_config.num_hidden_layers)
    if cfg.target_hidden_size != th or cfg.vocab_size != tv:
        raise LtdError(
            f"drafter {where} was built for hidden size {cfg.target_hidden_size} and vocabulary "
            f"{cfg.vocab_size}, but the target has hidden size {th} and vocabulary {tv}; "
            "use a drafter trained for this target (ltd train-drafter)"
        )
    bad = [i for i in cfg.eagle_aux_hidden_state_layer_ids if not 0 <= i <= n]
    if bad:
        raise LtdError(f"drafter {where} reads target layers {bad}, but the target has {n} layers")


WIDE_ROWS = 16  # CPU catch-ups of at least this many positions run on a float32 twin


class Eagle3Drafter:
    """Drafts with an :class:`Eagle3Head` on features from the target backend."""

    def __init__(self, head: Eagle3Head, embed_tokens: nn.Embedding) -> None:
        self.head = head.eval()
        self.embed = embed_tokens
        self.feature_layers = list(head.config.eagle_aux_hidden_state_layer_ids)
        p = next(head.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._wide: Eagle3Head | None = None
        self._wide_key: tuple = ()
        self._vocab_maps: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset()

    def _wide_head(self) -> Eagle3Head | None:
        """A float32 twin of a half-precision head on the CPU, for wide catch-ups.

        Why: a half-precision head is the fast choice for the 1-3 positions a cycle adds
        (memory-bound), but this CPU has no native bf16 arithmetic, so the catch-up over
        a whole prompt is compute-bound and slow: 430 ms in bfloat16 against 111 ms in
        float32 for a 671-token prompt (SmolLM2 head, 1 thread). The twin is rebuilt
        whenever the serving weights change (online learning writes them in place).
        """
        if self.device.type != "cpu" or self.dtype == torch.float32:
            return None
        key = tuple((p.data_ptr(), p._version) for p in self.head.parameters())
        if self._wide is None or key != self._wide_key:
            with torch.inference_mode(False), torch.no_grad():
                self._wide = copy.deepcopy(self.head).float().eval()
            self._wide_key = key
        return self._wide

    def reset(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._consumed = 0  # head entries committed (= target positions consumed)
        self._tokens: list[int] = []
        self._pending: list[torch.Tensor] = []  # target features not yet consumed
        self._spec_k: list[torch.Tensor] = []
        self._spec_v: list[torch.Tensor] = []
        self._spec_parent: list[int] = []  # parent spec entry (-1 = context)
        self._node_entry: dict[int, int] = {}
        self.node_hidden: dict[int, torch.Tensor] = {}  # head output state of each drafted node (0: the root)

    @property
    def tokens(self) -> list[int]:
        """The committed sequence as last synced."""
        return self._tokens

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self._tokens = list(tokens)
        if features is not None and features.numel():
            self._pending.append(features.to(self.device, self.dtype))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.to(self.embed.weight.device)).to(self.device, self.dtype)

    @torch.inference_mode()
    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logp = self._topk(self.consume()[0][-1:], k)
        return tokens[0], logp[0]

    def consume(self) -> tuple[torch.Tensor, int]:
        """Run the head over the target features synced since the last root.

        Returns the head's output states of the new entries [n, H] (the last one is the
        root's) and the first new entry's position. Wrappers that learn from every
        committed position (:class:`ltd.online.knn_drafter.KnnDrafter`) read them all.
        """
        if not self._pending:
            raise RuntimeError("EAGLE-3 drafter has no target features to draft from")
        feats = torch.cat(self._pending, dim=0)
        self._pending = []
        t0, n = self._consumed, feats.shape[0]
        if t0 + n + 1 > len(self._tokens):
            raise RuntimeError("more target features than committed tokens")
        nxt = torch.tensor(self._tokens[t0 + 1 : t0 + n + 1], dtype=torch.long)
        positions = torch.arange(t0, t0 + n, device=self.device).unsqueeze(0)
        allowed = torch.ones((n, t0 + n), dtype=torch.bool, device=self.device)
        allowed[:, t0:] = torch.tril(torch.ones((n, n), dtype=torch.bool, device=self.device))
        wide = self._wide_head() if n >= WIDE_ROWS else None
        if wide is None:
            out, kk, vv = self.head(
                feats.unsqueeze(0), self._embed(nxt).unsqueeze(0), positions, allowed.unsqueeze(0), self._k, self._v
            )
        else:
            f32 = torch.float32
            out, kk, vv = wide(
                feats.to(f32).unsqueeze(0), self._embed(nxt).to(f32).unsqueeze(0), positions, allowed.unsqueeze(0),
                None if self._k is None else self._k.to(f32), None if self._v is None else self._v.to(f32),
            )
            out, kk, vv = out.to(self.dtype), kk.to(self.dtype), vv.to(self.dtype)
        self._k = kk if self._k is None else torch.cat([self._k, kk], dim=2)
        self._v = vv if self._v is None else torch.cat([self._v, vv], dim=2)
        self._consumed = t0 + n
        self.node_hidden = {0: out[0, -1]}
        self._node_entry = {}
        return out[0], t0

    def _topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(self.head.logits(hidden).float(), dim=-1)
        k = min(k, logp.shape[-1])
        val, idx = torch.topk(logp, k, dim=-1)
        return self.head.draft_to_target(idx).cpu(), val.cpu()

    def vocab_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's vocabulary maps (:meth:`Eagle3Head.vocab_maps`), built once."""
        if self._vocab_maps is None:
            self._vocab_maps = self.head.vocab_maps()
        return self._vocab_maps

    @torch.inference_mode()
    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._topk(self.advance(tree, nodes), k)

    def advance(self, tree: Tree, nodes: torch.Tensor) -> torch.Tensor:
        """Run the head on drafted ``nodes`` (their parents' states known); returns their states [m, H]."""
        node_list = nodes.tolist()
        m = len(node_list)
        base = len(self._spec_parent)
        parents_entry = []
        for j, node in enumerate(node_list):
            p = int(tree.parents[node])
            parents_entry.append(-1 if p == 0 else self._node_entry[p])
            self._node_entry[node] = base + j
        all_parents = torch.tensor(self._spec_parent + parents_entry, dtype=torch.long)
        anc = ancestor_mask(all_parents)[base:].to(self.device)  # [m, base + m]
        allowed = torch.cat([torch.ones((m, self._consumed), dtype=torch.bool, device=self.device), anc], dim=1)
        depth = tree.depths[nodes].to(self.device)
        positions = (self._consumed - 1 + depth).unsqueeze(0)
        hidden = torch.stack([self.node_hidden[int(tree.parents[n])] for n in node_list]).unsqueeze(0)
        emb = self._embed(tree.tokens[nodes]).unsqueeze(0)
        past_k = torch.cat([self._k] + self._spec_k, dim=2) if self._spec_k else self._k
        past_v = torch.cat([self._v] + self._spec_v, dim=2) if self._spec_v else self._v
        out, kk, vv = self.head(hidden, emb, positions, allowed.unsqueeze(0), past_k, past_v, fuse=False)
        self._spec_k.append(kk)
        self._spec_v.append(vv)
        self._spec_parent.extend(parents_entry)
        for j, node in enumerate(node_list):
            self.node_hidden[node] = out[0, j]
        return out[0]

    def end(self) -> None:
        self._spec_k, self._spec_v, self._spec_parent = [], [], []
        self._node_entry, self.node_hidden = {}, {}


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


def shrink_draft_vocab(head: Eagle3Head, keep_target_ids: torch.Tensor) -> Eagle3Head:
    """A copy of ``head`` whose draft vocabulary is ``keep_target_ids`` (a subset of its own).

    Why: the output layer is most of a head's bytes (draft vocab x hidden); a head trained
    with a large draft vocabulary can be cut to a size budget without retraining, dropping
    the rarest tokens, whose rows the selection seldom reaches anyway.
    """
    _, row_of = head.vocab_maps()
    keep = torch.unique(keep_target_ids.to(torch.long).cpu())  # sorted
    rows = torch.full_like(keep, -1)
    inside = (keep >= 0) & (keep < row_of.numel())  # ids outside the target vocabulary are lacking too
    rows[inside] = row_of[keep[inside]]
    if bool((rows < 0).any()):
        missing = int(keep[rows < 0][0])
        raise LtdError(f"cannot shrink the draft vocabulary to tokens it lacks (e.g. target id {missing}); keep a subset of it")
    cfg = Eagle3Config.from_json_dict({**head.config.to_json_dict(), "draft_vocab_size": int(keep.numel())})
    small = Eagle3Head(cfg).to(dtype=head.lm_head.weight.dtype)
    state = {k: v for k, v in head.state_dict().items() if k not in ("lm_head.weight", "d2t", "t2d")}
    state["lm_head.weight"] = head.lm_head.weight.detach().cpu()[rows]
    state["d2t"], state["t2d"] = small.d2t, small.t2d
    small.load_state_dict(state, strict=True)
    small.set_vocab_map(keep)
    return small
