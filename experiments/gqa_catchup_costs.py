"""Two costs behind the hf backend's grouped-heads switch and the head's float32 catch-up twin (median ms).

1. One layer's masked attention of SmolLM2's shape (9 query, 3 key/value heads, dim 64):
   keys/values copied per head group first (transformers' ``repeat_kv``, its path with a
   mask) against torch's SDPA reading the grouped heads in place (``enable_gqa``), which
   the hf backend switches on around its CPU forwards (``ltd.backends.hf_kernels``).
2. The shipped head's first catch-up over a prompt, bfloat16 against float32 weights
   (why a half-precision head catches up on wide inputs with a float32 twin).

    .venv/bin/python experiments/gqa_catchup_costs.py --threads 1 --out benchmarks/gqa-catchup-costs-2026-11-27
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv

from ltd.bench.machine import machine_info
from ltd.bench.timing import median_ms, micro_bench_args
from ltd.drafting.eagle3 import load_head
from ltd.engine import builtin_drafter_dir
from ltd.fileio import atomic_write_json, atomic_write_text

HEADS, KV_HEADS, DIM = 9, 3, 64


def attention_ms(context: int, queries: int, repeats: int) -> dict[str, float]:
    q = torch.randn(1, HEADS, queries, DIM)
    k, v = torch.randn(1, KV_HEADS, context, DIM), torch.randn(1, KV_HEADS, context, DIM)
    mask = torch.zeros(1, 1, queries, context)
    rep = HEADS // KV_HEADS

    def copied() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask)

    def in_place() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    if not torch.equal(copied(), in_place()):
        raise SystemExit("grouped heads in place differ from the copied path")
    return {"copied": round(median_ms(copied, repeats), 4), "in_place": round(median_ms(in_place, repeats), 4)}


def catch_up_ms(dtype: torch.dtype, tokens: int, repeats: int) -> float:
    head = load_head(builtin_drafter_dir("smollm2-135m-eagle3"), dtype=dtype)
    hidden = head.config.hidden_size
    feats = torch.randn(1, tokens, 3 * hidden, dtype=dtype)
    emb = torch.randn(1, tokens, hidden, dtype=dtype)
    positions = torch.arange(tokens).unsqueeze(0)
    allowed = torch.tril(torch.ones((tokens, tokens), dtype=torch.bool)).unsqueeze(0)

    @torch.inference_mode()
    def run() -> None:
        head(feats, emb, positions, allowed)

    return round(median_ms(run, repeats, warmup=1), 2)


def main() -> None:
    args = micro_bench_args(__doc__.splitlines()[0], repeats=50)
    attention = {f"{c}x{q}": attention_ms(c, q, args.repeats) for c in (128, 700) for q in (2, 4, 9)}
    catch_up = {str(n): {name: catch_up_ms(dt, n, max(3, args.repeats // 10)) for name, dt in
                         (("bfloat16", torch.bfloat16), ("float32", torch.float32))} for n in (100, 671)}
    machine = machine_info("float32", "cpu")
    out = Path(args.out)
    atomic_write_json(out / "results.json", {"machine": machine, "threads": args.threads,
                                             "attention_ms": attention, "catch_up_ms": catch_up})
    lines = [f"# Session 8 costs ({machine['cpu_model']}, {args.threads} threads, median ms)", "",
             "One layer's masked attention (context x queries): keys/values copied per group | read in place", "",
             "| shape | copied | in place |", "|---|---|---|"]
    lines += [f"| {s} | {t['copied']:.3f} | {t['in_place']:.3f} |" for s, t in attention.items()]
    lines += ["", "Shipped head's first catch-up over a prompt, by weight dtype", "",
              "| prompt tokens | bfloat16 | float32 |", "|---|---|---|"]
    lines += [f"| {n} | {t['bfloat16']:.1f} | {t['float32']:.1f} |" for n, t in catch_up.items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
