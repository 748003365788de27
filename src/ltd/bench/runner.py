"""The benchmark loop: models loaded once, warm-up, methods interleaved per prompt.

Fairness on a shared CPU comes from the order of work, not from trusting the machine:
every method runs once on the first prompt before anything is timed (allocations, lazy
initialisation), then for each prompt and each repeat every method runs back to back
(A B C A B C ...), so a slow spell of the machine hits all methods of that prompt and the
pairwise ratios in :mod:`ltd.bench.metrics` cancel it. Ctrl-C stops the loop and the
results measured so far are still written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ltd.bench import metrics
from ltd.bench.methods import BASELINE, MethodRunner, MethodSpec, Sampling, resolve_assistant
from ltd.bench.report import write_all, write_results_json
from ltd.bench.suites import Question
from ltd.defaults import DEFAULT_HEAD_DTYPE, DEFAULT_KERNELS
from ltd.engine import Engine, GenerateResult, check_backend, reference_method
from ltd.errors import LtdError
from ltd.machine import machine_info, utc_now
from ltd.peers.llamacpp_peer import LlamaCppSpecPeer, peers_built, unbuilt_message

log = logging.getLogger(__name__)

WARMUP_TOKENS = 16
# llama.cpp's plain greedy method: the reference of llama.cpp's own speculative methods
# when it is benchmarked too (same engine, same quantized kernels); otherwise they are
# compared with hf across engines.
LLAMACPP_REFERENCE = "llama.cpp"
# llama.cpp's speculative tool with no drafts: the closest reference (same prompt batching)
LLAMACPP_SPEC_REFERENCE = "llama.cpp-spec:none"
REFERENCES = (BASELINE, LLAMACPP_REFERENCE, LLAMACPP_SPEC_REFERENCE)
TIE_MARGIN = 1e-4  # below this a top-2 logit margin is a numerical tie (docs/design.md)
SCHEMA_VERSION = 1


@dataclass
class GridSpec:
    """The static D x V sweep at fixed K, run on one suite."""

    suite: str
    depths: list[int]
    sizes: list[int]
    topk: int
    peer_types: list[str] = field(default_factory=list)  # --grid-peers: llama.cpp built-in types
    peer_lengths: list[int] = field(default_factory=list)


@dataclass
class BenchConfig:
    """Everything one bench needs; ``source`` only describes where questions came from."""

    model: str
    methods: list[MethodSpec]
    questions: list[Question]
    drafter: str | None = None
    assistant: str | None = None
    repeats: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    device: str = "cpu"
    dtype: str = "float32"
    multi_turn: bool = False
    warmup: bool = True
    progress: bool = True
    prompt_lookup_tokens: int = 10
    grid: GridSpec | None = None
    source: dict = field(default_factory=dict)
    backend: str = "hf"
    threads: int | None = None  # torch / llama.cpp threads, also llama.cpp peers' (default: the library's choice)
    kernels: str = DEFAULT_KERNELS  # hf backend matmul plan (ltd.backends.hf_kernels); the hf baseline keeps stock kernels
    head_dtype: str = DEFAULT_HEAD_DTYPE  # EAGLE-3 draft head weights (drafts never change the output)
    skipped: list[str] = field(default_factory=list)  # one line per method dropped before running
    latency: str | None = None  # a full ltd profile file for cost-aware methods (default: the cached quick profile)

    @property
    def baseline(self) -> str:
        """``hf`` on transformers, ``llama.cpp`` on llama.cpp: what every ratio is against."""
        return reference_method(self.backend)

    def validate(self) -> None:
        if self.repeats < 1:
            raise LtdError(f"--repeats must be at least 1, got {self.repeats}")
        if self.repeats > 1 and any(m.online for m in self.methods):
            raise LtdError("+online methods learn from every run, so a repeat would replay a prompt they have learned; use --repeats 1")
        if self.max_new_tokens < 1:
            raise LtdError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LtdError(f"--temperature must be >= 0, got {self.temperature}")
        if not self.questions:
            raise LtdError("no questions to run; check --suites/--questions and --limit")
        check_backend(self.backend)
        if not self.methods or self.methods[0].kind != self.baseline:
            raise LtdError(f"the method list must start with the {self.baseline} baseline (parse it with parse_methods)")
        peers = [m.label for m in self.methods if m.is_llamacpp_spec]
        if peers and self.temperature != 0.0:
            raise LtdError(f"{', '.join(peers)} run greedy only; use --temperature 0 or drop them from --methods")

    def drop_unbuilt_peers(self) -> list[str]:
        """Drop llama.cpp peers when their tools are not built; returns one line each.

        A bench of many methods should not fail because one optional peer is missing:
        it runs the rest and says how to get the peer.
        """
        if peers_built():
            return []
        dropped = [m for m in self.methods if m.is_llamacpp_spec]
        self.methods = [m for m in self.methods if not m.is_llamacpp_spec]
        lines = [unbuilt_message(m.label) for m in dropped]
        for line in lines:
            log.warning("%s", line)
        self.skipped.extend(lines)
        return lines

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "drafter": self.drafter,
            "assistant": self.assistant,
            "methods": [m.label for m in self.methods],
            "repeats": self.repeats,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "device": self.device,
            "dtype": self.dtype,
            "head_dtype": self.head_dtype,
            "backend": self.backend,
            "threads": self.threads,
            "multi_turn": self.multi_turn,
            "warmup": self.warmup,
            "prompt_lookup_tokens": self.prompt_lookup_tokens,
            "grid": asdict(self.grid) if self.grid else None,
            "skipped": list(self.skipped),
            "latency": self.latency,
            "questions": len(self.questions),
            "suites": sorted({q.suite for q in self.questions}),
            **self.source,
        }


@dataclass
class _Mismatch:
    """The first greedy output of a method that differs from the reference on a prompt."""

    prompt_key: str
    repeat: int
    prompt: list[int]
    reference: list[int]
    output: list[int]
    reference_label: str = BASELINE

    @property
    def position(self) -> int:
        for i, (a, b) in enumerate(zip(self.reference, self.output)):
            if a != b:
                return i
        return min(len(self.reference), len(self.output))


def encode_turns(engine: Engine, turns: Sequence[str], replies: Sequence[str]) -> list[int]:
    """Prompt ids of user turn ``len(replies)`` after the earlier turns and replies.

    The first turn goes through :meth:`Engine.encode` exactly like ``ltd generate``;
    later turns use the chat template over the whole conversation. Earlier replies are
    the baseline's, so every method sees the identical prompt and ratios stay paired.
    """
    if not replies:
        return engine.encode(turns[0])
    tok = engine.target.tokenizer
    if not getattr(tok, "chat_template", None):
        raise LtdError("--multi-turn needs a model with a chat template; drop --multi-turn")
    messages = []
    for user, reply in zip(turns, replies):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": turns[len(replies)]})
    return engine.encode_messages(messages)


TIE_ROUNDING_STEPS = 4  # in a 16-bit dtype, margins within this many rounding steps are ties


def tie_margin(backend, top_logit: float) -> float:
    """Top-2 logit margin below which two greedy outputs may differ by rounding alone.

    In fp32 it is :data:`TIE_MARGIN` (docs/design.md), or the backend's own wider
    margin (llama.cpp's stock kernels move logits with the batch size). In a 16-bit dtype
    one rounding step at the logit's size is ``eps * |logit|`` (0.125 at a logit of 20 in
    bfloat16), and a tree sums in another order than plain decoding, which moves the
    logits by a few such steps: measured bfloat16 differences on SmolLM2 sat at margins of
    0 to 0.25 (2 steps), which the fp32 margin alone would call bugs.
    """
    base = float(getattr(backend, "tie_margin", TIE_MARGIN))
    dtype = getattr(backend, "dtype", torch.float32)
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 0.0
    return max(base, TIE_ROUNDING_STEPS * eps * abs(float(top_logit)))


@torch.inference_mode()
def reference_margin(backend, prompt: Sequence[int], reference: Sequence[int], position: int, other: int | None) -> dict:
    """Top-2 logit margin of the target after prompt + reference[:position].

    One plain causal pass through the backend (no tree): a margin below ~1e-4 means the
    two outputs differ at a numerical tie; anything larger points at a bug.
    """
    ids = list(prompt) + list(reference[:position])
    backend.reset()
    try:
        logits = backend.score(ids, list(range(-1, len(ids) - 1)), last_only=True).logits[-1].float()
    finally:
        backend.reset()
    top = torch.topk(logits, 2)
    out = {
        "reference_top2_margin": float(top.values[0] - top.values[1]),
        "reference_argmax": int(top.indices[0]),
        "reference_top_logit": float(top.values[0]),
    }
    ref_tok = reference[position] if position < len(reference) else None
    if ref_tok is not None and other is not None:
        out["logit_gap_reference_vs_output"] = float(logits[ref_tok] - logits[other])
    return out


class _Loop:
    """State of one bench run; a class only so that Ctrl-C can keep what it has."""

    def __init__(self, config: BenchConfig, engine: Engine, out_dir: Path | None) -> None:
        self.config = config
        self.engine = engine
        self.out_dir = out_dir
        self.sampling = Sampling(config.max_new_tokens, config.temperature, config.top_p, config.seed)
        self.runs: list[metrics.Run] = []
        self.references: dict[str, dict[str, list[int]]] = {}  # reference label -> prompt -> tokens
        self.matches: dict[str, dict[str, bool]] = {}
        self.mismatches: dict[str, dict[str, _Mismatch]] = {}
        self.runners = self._runners()
        self.warmup_seconds = 0.0
        self.interrupted = False
        self.started = utc_now()

    def _runners(self) -> list[MethodRunner]:
        cfg = self.config
        assistant, assistant_tok = None, None
        if any(m.kind == "hf-assisted" for m in cfg.methods):
            assistant, assistant_tok = resolve_assistant(self.engine, cfg.assistant, cfg.drafter, cfg.device, cfg.dtype)
        runners = []
        for m in list(cfg.methods):
            try:
                peer = self._peer(m)
            except LtdError as exc:  # a peer that cannot run here is skipped, not fatal
                line = f"skipping {m.label}: {exc}"
                log.warning("%s", line)
                cfg.skipped.append(line)
                cfg.methods.remove(m)
                continue
            runners.append(MethodRunner(self.engine, m, assistant, assistant_tok, cfg.prompt_lookup_tokens, peer=peer))
        return runners

    def _peer(self, spec: MethodSpec):
        """The llama.cpp tool binding of a ``llama.cpp-spec`` method (None for others)."""
        if not spec.is_llamacpp_spec:
            return None
        cfg = self.config
        return LlamaCppSpecPeer(spec.peer, self.engine, cfg.model, cfg.drafter, cfg.assistant, threads=cfg.threads)

    def _turns(self, q: Question) -> int:
        return len(q.turns) if self.config.multi_turn or q.all_turns else 1

    def warm_up(self) -> None:
        q = self.config.questions[0]
        prompt = encode_turns(self.engine, q.turns, [])
        warm = Sampling(min(self.config.max_new_tokens, WARMUP_TOKENS), self.config.temperature, self.config.top_p, self.config.seed)
        t0 = time.perf_counter()
        for runner in self.runners:
            runner.run(prompt, warm)
            runner.restart_online()  # the warm-up prompt is the first measured one: unlearn it
        self.warmup_seconds = time.perf_counter() - t0
        log.info("warm-up done in %.1f s", self.warmup_seconds)

    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        total = sum(self._turns(q) for q in cfg.questions) * cfg.repeats * len(self.runners)
        bar = tqdm(total=total, unit="run", desc="bench", disable=not cfg.progress, dynamic_ncols=True)
        try:
            if cfg.warmup:
                bar.set_postfix_str("warm-up")
                self.warm_up()
            for q in cfg.questions:
                replies: list[str] = []
                for turn in range(self._turns(q)):
                    key = q.turn_key(turn)
                    prompt = encode_turns(self.engine, q.turns, replies)
                    reply = self._measure(q, key, prompt, bar)
                    replies.append(reply)
                self.checkpoint()
        except KeyboardInterrupt:
            self.interrupted = True
            log.warning("interrupted: writing the %d runs measured so far", len(self.runs))
        finally:
            bar.close()

    def _measure(self, q: Question, key: str, prompt: list[int], bar) -> str:
        """All repeats of all methods on one prompt, interleaved; returns the baseline's reply."""
        reply = ""
        for rep in range(self.config.repeats):
            sampling = Sampling(
                self.sampling.max_new_tokens,
                self.sampling.temperature,
                self.sampling.top_p,
                None if self.sampling.seed is None else self.sampling.seed + rep,
            )
            done: list[tuple[str, GenerateResult]] = []
            for runner in self.runners:
                label = runner.spec.label
                bar.set_postfix_str(f"{q.suite} {label}", refresh=False)
                done.append((label, runner.run(prompt, sampling)))
                bar.update(1)
            # references first, so that every method is compared whatever the run order
            rank = {ref: i for i, ref in enumerate(REFERENCES)}
            for label, res in sorted(done, key=lambda item: rank.get(item[0], len(rank))):
                self._record(q, key, rep, label, prompt, res)
                if label == self.config.baseline and rep == 0:
                    reply = res.text
        return reply

    def _reference_for(self, label: str) -> str:
        labels = [m.label for m in self.config.methods]
        if label.startswith("llama.cpp-spec:") and label != LLAMACPP_SPEC_REFERENCE:
            for ref in (LLAMACPP_SPEC_REFERENCE, LLAMACPP_REFERENCE):
                if ref in labels:
                    return ref
        return self.config.baseline

    def _record(self, q: Question, key: str, rep: int, label: str, prompt: list[int], res: GenerateResult) -> None:
        mean_acc = None if res.mean_accepted != res.mean_accepted else float(res.mean_accepted)  # NaN -> None
        self.runs.append(metrics.Run(label, key, q.suite, rep, res.new_tokens, res.seconds, res.cycles, mean_acc))
        if not self.sampling.greedy:
            return
        if label in REFERENCES:
            self.references.setdefault(label, {}).setdefault(key, list(res.tokens))
            if label == self.config.baseline:
                return
        ref_label = self._reference_for(label)
        ref = self.references.get(ref_label, {}).get(key)
        if ref is None:
            return
        same = self._same_output(label, ref, list(res.tokens))
        per = self.matches.setdefault(label, {})
        per[key] = per.get(key, True) and same
        if not same and key not in self.mismatches.setdefault(label, {}):
            self.mismatches[label][key] = _Mismatch(key, rep, list(prompt), ref, list(res.tokens), ref_label)

    def _same_output(self, label: str, ref: list[int], out: list[int]) -> bool:
        """Equal ids; for llama.cpp's tools, whose ids are their printed text tokenized
        again, equal text is enough: the model may generate a split that tokenizing the
        text merges (" An" + "a..." read back as " Ana"), the same output in other ids.
        Both cut at the token limit, the shorter text must begin the longer one."""
        if out == ref:
            return True
        if not label.startswith("llama.cpp-spec:"):
            return False
        tok = self.engine.target.tokenizer
        a, b = tok.decode(ref, skip_special_tokens=False), tok.decode(out, skip_special_tokens=False)
        return a == b or (len(out) == len(ref) and (a.startswith(b) or b.startswith(a)))

    # -- results ---------------------------------------------------------------------
    def mismatch_report(self, with_margins: bool) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for label, per in self.mismatches.items():
            rows = []
            for mm in per.values():
                pos = mm.position
                row = {
                    "prompt": mm.prompt_key,
                    "repeat": mm.repeat,
                    "position": pos,
                    "reference_token": mm.reference[pos] if pos < len(mm.reference) else None,
                    "output_token": mm.output[pos] if pos < len(mm.output) else None,
                    "reference_length": len(mm.reference),
                    "output_length": len(mm.output),
                    "reference": mm.reference_label,
                }
                # llama.cpp's own tools against transformers' dense weights: another engine, not a tie test
                cross_engine = label.startswith("llama.cpp-spec") and mm.reference_label == BASELINE and self.config.baseline == BASELINE
                if cross_engine:
                    row["cross_engine"] = True
                if with_margins and mm.reference_label == self.config.baseline:
                    row.update(reference_margin(self.engine.backend, mm.prompt, mm.reference, pos, row["output_token"]))
                    margin = row["reference_top2_margin"]
                    tie = tie_margin(self.engine.backend, row["reference_top_logit"])
                    row["numerical_tie"] = margin < tie
                    row["tie_margin"] = tie
                    if cross_engine:
                        log.info("%s differs from hf on %s at token %d (llama.cpp vs transformers numerics)", label, mm.prompt_key, pos)
                    elif not row["numerical_tie"]:
                        log.warning("%s differs from %s on %s at token %d with margin %.3g: likely a bug", label, self.config.baseline, mm.prompt_key, pos, margin)
                rows.append(row)
            out[label] = rows
        return out

    def complete_runs(self) -> list[metrics.Run]:
        """Runs of prompts that every method finished for every repeat.

        A prompt cut short by Ctrl-C would count for some methods and not others, which
        skews the per-repeat totals; it is dropped.
        """
        need = self.config.repeats * len(self.runners)
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.prompt] = counts.get(r.prompt, 0) + 1
        return [r for r in self.runs if counts[r.prompt] == need]

    def results(self, with_margins: bool = False) -> dict:
        cfg = self.config
        labels = [m.label for m in cfg.methods]
        runs = self.complete_runs()
        overall, per_suite = metrics.summarize_all(runs, labels, cfg.baseline, self.matches if self.sampling.greedy else None)
        mismatches = self.mismatch_report(with_margins)
        for label, summary in overall.items():
            summary["mismatches"] = mismatches.get(label, [])
        statics = [m.label for m in cfg.methods if m.is_static]
        best_static = None
        best = metrics.best_method(overall, statics)
        if best is not None:
            spec = next(m for m in cfg.methods if m.label == best)
            best_static = {
                "method": best,
                "depth": spec.depth,
                "topk": spec.topk,
                "size": spec.size,
                "speedup": overall[best]["speedup"],
                "tokens_per_second": overall[best]["tokens_per_second"],
                "selected_on": sorted(per_suite),
                "criterion": f"median pairwise speedup over {cfg.baseline}",
            }
        peers = [m.label for m in cfg.methods if m.is_llamacpp_spec and m.label != LLAMACPP_SPEC_REFERENCE]
        best_peer = metrics.best_method(overall, peers)
        best_llamacpp_spec = None
        if best_peer is not None:
            spec = next(m for m in cfg.methods if m.label == best_peer)
            best_llamacpp_spec = {
                "method": best_peer,
                "type": spec.peer.type,
                "draft_length": spec.peer.n or None,
                "speedup": overall[best_peer]["speedup"],
                "tokens_per_second": overall[best_peer]["tokens_per_second"],
                "selected_on": sorted(per_suite),
                "criterion": f"median pairwise speedup over {cfg.baseline}",
            }
        return {
            "schema_version": SCHEMA_VERSION,
            "date": utc_now(),
            "started": self.started,
            "interrupted": self.interrupted,
            "baseline": cfg.baseline,
            "config": cfg.to_json(),
            "machine": machine_info(cfg.dtype, cfg.device),
            "kernels": _kernel_summary(self.engine),
            "costs": {str(k): c.to_json() for k, c in self.engine.cost_tables.items()},  # what cost-aware methods decided from
            "warmup_seconds": round(self.warmup_seconds, 3),
            "methods": overall,
            "suites": per_suite,
            "best_static": best_static,
            "best_llamacpp_spec": best_llamacpp_spec,
            "skipped": list(cfg.skipped),
            "runs": [
                {**asdict(r), "tokens_per_second": metrics.throughput(r.new_tokens, r.seconds)} for r in runs
            ],
            "incomplete_runs_dropped": len(self.runs) - len(runs),
        }

    def checkpoint(self) -> None:
        """results.json after every prompt, so even a killed bench leaves its numbers."""
        if self.out_dir is not None:
            write_results_json(self.results(with_margins=False), self.out_dir)


def _kernel_summary(engine: Engine) -> dict | None:
    """The matmul plan of the engine's own forwards (hf backend), for the report header."""
    plan = getattr(engine.backend, "kernel_plan", None)
    if plan is None:
        return None
    return plan.summary()


def run_bench(config: BenchConfig, out_dir: str | Path | None = None, engine: Engine | None = None) -> dict:
    """Run a bench and return its results; with ``out_dir``, also write results.json,
    report.md and the plots there (also after Ctrl-C, with what was measured)."""
    config.drop_unbuilt_peers()
    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if engine is None:
        t0 = time.perf_counter()
        engine = Engine.load(
            config.model, drafter=config.drafter, device=config.device, dtype=config.dtype,
            backend=config.backend, threads=config.threads, kernels=config.kernels, head_dtype=config.head_dtype,
        )
        log.info("models loaded in %.1f s", time.perf_counter() - t0)
    if config.latency:
        engine.latency_file = config.latency
    loop = _Loop(config, engine, out)
    loop.run()
    try:
        results = loop.results(with_margins=not loop.interrupted)
    except KeyboardInterrupt:
        loop.interrupted = True
        results = loop.results(with_margins=False)
    if out is not None:
        write_all(results, out)
    return results
