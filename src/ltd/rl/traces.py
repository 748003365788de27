"""Counterfactual replay traces: max-depth draft trees along the target's greedy outputs.

For greedy decoding the output of lossless speculative decoding is the target's greedy
output whatever the controller does, so every context a controller can visit is known in
advance: at output position p the committed context is ``prompt + output[:p]`` and the
pending token (the tree's root) is ``output[p]``. The recorder drafts, at every such
position, the tree of the maximum depth D. The tree drafted to any depth d <= D is its
first d levels (drafting never looks ahead), and :func:`ltd.tree.select` depends only on
scores, so for any (d, V) the accepted length is known without the target: the accepted
path always lies on the greedy continuation ``output[p+1], output[p+2], ...``, hence it
is the longest prefix of that continuation whose nodes (followed from the root by token)
are all in ``select(tree up to depth d, V)``. See :func:`accepted_length`.

(Live verification computes logits on tree nodes, which may differ from the sequential
greedy logits by ~1e-6; at a numerical near-tie the live acceptance can then differ from
replay. That is rare and ignored here.)

Storage: ``OUT/manifest.json`` plus one ``seq-NNNNN.npz`` per prompt, each written
atomically, so recording is resumable (finished prompts are skipped). Per sequence:

- ``prompt``, ``output``: token ids (the greedy continuation at p is ``output[p+1:]``);
- ``offsets``, ``tokens``, ``parents``, ``depths``, ``scores``: the per-position trees
  packed end to end (position p owns ``offsets[p]:offsets[p+1]``), level by level, with
  parents local to the position's tree. With ``max_size`` the tree is pruned to the
  nodes that some ``select(tree_d, V <= max_size)`` can include, which is exact for
  every such (d, V);
- ``level_counts`` [n, D+1]: drafted nodes of depth <= d in the *unpruned* tree (what a
  verification of V nodes actually costs is set by ``min(V, level_counts[d])``);
- ``candidates`` [n, D, k*k]: cumulative scores of the candidates proposed by each draft
  step, sorted descending, -inf padded (the depth policy's observation);
- ``step_seconds`` [n, D]: measured draft step times during recording;
- ``depth`` [n]: draft steps done (D, or fewer near the end of the model's context).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ltd.drafting.suffix import SIGNAL_FIELDS
from ltd.errors import LtdError
from ltd.fileio import atomic_write, atomic_write_json, read_json
from ltd.rl.prompts import FollowUp, Prompt, prompt_of
from ltd.tree import Tree, select

log = logging.getLogger(__name__)

TRACE_FORMAT = "ltd-traces"
TRACE_VERSION = 1
MANIFEST = "manifest.json"


# -- one decision point -------------------------------------------------------------------


@dataclass
class TracePosition:
    """The recorded tree at one output position of one sequence."""

    position: int
    context_length: int  # DecodeState.context_length: prompt + output[:position + 1]
    tokens: np.ndarray
    parents: np.ndarray
    depths: np.ndarray
    scores: np.ndarray
    level_counts: np.ndarray
    candidates: np.ndarray
    step_seconds: np.ndarray
    continuation: np.ndarray  # greedy tokens after the pending one
    depth: int
    max_size: int | None = None
    signals: np.ndarray | None = None  # the drafter's signals after the root step (SIGNAL_FIELDS), if it has them

    @property
    def committed_length(self) -> int:
        """Tokens in the target's cache when this tree is verified."""
        return self.context_length - 1

    def drafted(self, depth: int) -> int:
        """Drafted nodes of depth <= ``depth`` in the full (unpruned) tree."""
        return int(self.level_counts[max(0, min(depth, self.depth))])

    def nodes_up_to(self, depth: int) -> int:
        """Stored nodes (root included) of depth <= ``depth``: a prefix, levels are in order."""
        return int(np.searchsorted(self.depths, max(0, min(depth, self.depth)), side="right"))

    def tree(self, depth: int | None = None) -> Tree:
        """The stored tree restricted to ``depth`` levels, as a :class:`ltd.tree.Tree`."""
        n = self.nodes_up_to(self.depth if depth is None else depth)
        return Tree(
            tokens=torch.from_numpy(self.tokens[:n].astype(np.int64)),
            parents=torch.from_numpy(self.parents[:n].astype(np.int64)),
            depths=torch.from_numpy(self.depths[:n].astype(np.int64)),
            scores=torch.from_numpy(self.scores[:n].astype(np.float32)),
        )

    def candidate_scores(self, step: int) -> np.ndarray:
        """Scores of the candidates proposed by draft step ``step`` (1-based), descending."""
        if step < 1:
            return np.empty(0, dtype=np.float32)
        row = self.candidates[step - 1]
        return row[np.isfinite(row)]


def accepted_length(pos: TracePosition, depth: int, size: int) -> int:
    """Drafted tokens a live cycle would accept at ``pos`` drafting ``depth`` steps and
    verifying ``size`` nodes (the bonus token not counted). Reference implementation with
    :func:`ltd.tree.select`; :func:`path_ranks` is the fast equivalent."""
    if depth <= 0 or size <= 0:
        return 0
    if pos.max_size is not None and size > pos.max_size:
        raise ValueError(f"size {size} exceeds the recorded max size {pos.max_size}")
    sub = select(pos.tree(depth), size).tree
    kids = sub.children()
    tokens = sub.tokens.tolist()
    node, length = 0, 0
    for tok in pos.continuation[: min(depth, pos.depth)].tolist():
        match = next((c for c in kids[node] if tokens[c] == tok), None)
        if match is None:
            break
        node, length = match, length + 1
    return length


def _greedy_path(tokens: np.ndarray, parents: np.ndarray, continuation: np.ndarray, depth: int) -> list[int]:
    """Node indices (root excluded) following the continuation from the root by token."""
    child: dict[tuple[int, int], int] = {}
    for i in range(1, tokens.size):
        child.setdefault((int(parents[i]), int(tokens[i])), i)
    path, node = [], 0
    for tok in continuation[:depth].tolist():
        nxt = child.get((node, int(tok)))
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


def _ranks_closed(order: np.ndarray, parents: np.ndarray) -> bool:
    """True when every drafted node ranks after its parent (then top-V sets are closed)."""
    rank = np.empty(order.size + 1, dtype=np.int64)
    rank[0] = -1
    rank[order + 1] = np.arange(order.size)
    return bool(np.all(rank[parents[1:]] < rank[1:]))


def path_ranks(pos: TracePosition) -> np.ndarray | None:
    """``r[d, j]``: rank, among drafted nodes of depth <= d, of the greedy path's node at
    depth j + 1 (inf when absent or deeper than d). Then the accepted length of (d, V) is
    ``(r[d] < V).sum()``. None when float ties break the parent-before-child ranking (use
    :func:`accepted_length` then)."""
    D = pos.depth
    drafted_scores = pos.scores[1:].astype(np.float64)
    drafted_depths = pos.depths[1:].astype(np.int64)
    order = np.lexsort((np.arange(drafted_scores.size), drafted_depths, -drafted_scores))
    if drafted_scores.size and not _ranks_closed(order, pos.parents.astype(np.int64)):
        return None
    path = _greedy_path(pos.tokens, pos.parents, pos.continuation, D)
    ranks = np.full((D + 1, max(D, 1)), np.inf)
    if not path:
        return ranks
    where = np.empty(order.size, dtype=np.int64)
    where[order] = np.arange(order.size)
    depth_in_order = drafted_depths[order]
    for d in range(1, D + 1):
        before = np.cumsum(depth_in_order <= d) - 1  # rank among depth <= d at each slot
        for j, node in enumerate(path[:d]):
            ranks[d, j] = before[where[node - 1]]
    return ranks


def fast_accepted_length(ranks: np.ndarray, depth: int, size: int) -> int:
    if depth <= 0 or size <= 0:
        return 0
    return int(np.count_nonzero(ranks[min(depth, ranks.shape[0] - 1)] < size))


# -- packing ------------------------------------------------------------------------------


@dataclass
class PositionRecord:
    """What the recorder measured at one position, before packing."""

    tree: Tree
    candidates: list[torch.Tensor]  # per draft step
    step_seconds: list[float]
    signals: np.ndarray | None = None  # the drafter's signals after its root step


def _prune(tree: Tree, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the nodes to keep (root first, in order) and level counts of the full tree."""
    depths = tree.depths.numpy().astype(np.int64)
    D = int(depths.max()) if depths.size else 0
    level_counts = np.array([int(np.count_nonzero((depths >= 1) & (depths <= d))) for d in range(D + 1)], dtype=np.int32)
    n = depths.size
    if max_size is None or n <= 1:
        return np.arange(n), level_counts
    scores = tree.scores.numpy().astype(np.float64)[1:]
    dd = depths[1:]
    order = np.lexsort((np.arange(dd.size), dd, -scores))
    if not _ranks_closed(order, tree.parents.numpy().astype(np.int64)):
        return np.arange(n), level_counts  # pathological float ties: keep everything
    keep = np.zeros(n, dtype=bool)
    keep[0] = True
    depth_in_order = dd[order]
    for d in range(1, D + 1):
        before = np.cumsum(depth_in_order <= d) - 1
        at_d = depth_in_order == d
        keep[order[at_d] + 1] = before[at_d] < max_size  # rank within the tree of depth d
    return np.nonzero(keep)[0], level_counts


def pack_sequence(
    prompt: Sequence[int],
    output: Sequence[int],
    records: Sequence[PositionRecord],
    topk: int,
    max_depth: int,
    max_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Arrays of one sequence (see the module docstring), pruned to ``max_size``."""
    kk = topk * topk
    n = len(records)
    offsets = np.zeros(n + 1, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {"tokens": [], "parents": [], "depths": [], "scores": []}
    level_counts = np.zeros((n, max_depth + 1), dtype=np.int32)
    candidates = np.full((n, max_depth, kk), -np.inf, dtype=np.float32)
    step_seconds = np.zeros((n, max_depth), dtype=np.float32)
    depth = np.zeros(n, dtype=np.int16)
    has_signals = any(rec.signals is not None for rec in records)
    signals = np.zeros((n, len(SIGNAL_FIELDS)), dtype=np.float32)
    for p, rec in enumerate(records):
        if rec.signals is not None:
            signals[p] = rec.signals
        keep, counts = _prune(rec.tree, max_size)
        remap = np.full(len(rec.tree), -1, dtype=np.int64)
        remap[keep] = np.arange(keep.size)
        par = rec.tree.parents.numpy()[keep]
        parts["tokens"].append(rec.tree.tokens.numpy()[keep].astype(np.int32))
        parts["parents"].append(np.where(par >= 0, remap[np.clip(par, 0, None)], -1).astype(np.int32))
        parts["depths"].append(rec.tree.depths.numpy()[keep].astype(np.int16))
        parts["scores"].append(rec.tree.scores.numpy()[keep].astype(np.float32))
        offsets[p + 1] = offsets[p] + keep.size
        d = len(rec.candidates)
        depth[p] = d
        level_counts[p, : counts.size] = counts
        level_counts[p, counts.size :] = counts[-1]
        for s, cand in enumerate(rec.candidates[:max_depth]):
            c = -np.sort(-cand.numpy().astype(np.float32))[:kk]
            candidates[p, s, : c.size] = c
        step_seconds[p, : min(d, max_depth)] = rec.step_seconds[:max_depth]
    cat = {k: (np.concatenate(v) if v else np.zeros(0, dtype=np.float32 if k == "scores" else np.int32)) for k, v in parts.items()}
    return {
        "prompt": np.asarray(list(prompt), dtype=np.int32),
        "output": np.asarray(list(output), dtype=np.int32),
        "offsets": offsets,
        **cat,
        "level_counts": level_counts,
        "candidates": candidates,
        "step_seconds": step_seconds,
        "depth": depth,
        **({"signals": signals} if has_signals else {}),
    }


# -- one sequence -------------------------------------------------------------------------


@dataclass
class TraceSequence:
    """All recorded positions of one prompt's greedy output."""

    key: str
    arrays: dict[str, np.ndarray]
    topk: int
    max_depth: int
    max_size: int | None = None
    _ranks: dict[int, np.ndarray | None] = field(default_factory=dict, repr=False)

    @property
    def prompt(self) -> np.ndarray:
        return self.arrays["prompt"]

    @property
    def output(self) -> np.ndarray:
        return self.arrays["output"]

    @property
    def num_positions(self) -> int:
        """Decision points: positions 0 .. len(output) - 2 (the last token needs no cycle)."""
        return int(self.arrays["offsets"].size - 1)

    @property
    def cycle_tokens(self) -> int:
        """Tokens the cycles produce (output[0] comes from the prefill)."""
        return max(int(self.output.size) - 1, 0)

    def __len__(self) -> int:
        return self.num_positions

    def __getitem__(self, p: int) -> TracePosition:
        a = self.arrays
        if not 0 <= p < self.num_positions:
            raise IndexError(p)
        lo, hi = int(a["offsets"][p]), int(a["offsets"][p + 1])
        return TracePosition(
            position=p,
            context_length=int(self.prompt.size) + p + 1,
            tokens=a["tokens"][lo:hi],
            parents=a["parents"][lo:hi],
            depths=a["depths"][lo:hi],
            scores=a["scores"][lo:hi],
            level_counts=a["level_counts"][p],
            candidates=a["candidates"][p],
            step_seconds=a["step_seconds"][p],
            continuation=self.output[p + 1 :],
            depth=int(a["depth"][p]),
            max_size=self.max_size,
            signals=a["signals"][p] if "signals" in a else None,
        )

    def accepted(self, p: int, depth: int, size: int) -> int:
        """Accepted drafted tokens of (depth, size) at position p (cached fast path)."""
        if self.max_size is not None and size > self.max_size:
            raise LtdError(f"size {size} exceeds the traces' recorded --max-size {self.max_size}; re-record with a larger one")
        if p not in self._ranks:
            self._ranks[p] = path_ranks(self[p])
        ranks = self._ranks[p]
        if ranks is None:
            return accepted_length(self[p], depth, size)
        return fast_accepted_length(ranks, depth, size)

    @staticmethod
    def from_records(key, prompt, output, records, topk, max_depth, max_size=None) -> "TraceSequence":
        return TraceSequence(key, pack_sequence(prompt, output, records, topk, max_depth, max_size), topk, max_depth, max_size)


# -- recording ----------------------------------------------------------------------------


@torch.inference_mode()
def record_sequence(target, drafter, prompt: Sequence[int], output: Sequence[int], *, max_depth: int, topk: int) -> list[PositionRecord]:
    """Draft the max-depth tree at every output position of a known greedy output.

    The target scores ``prompt + output`` once (causal, with the drafter's feature
    layers); the drafter is then fed position by position exactly as the cycle feeds it
    (``sync`` with the committed tokens + pending token and the target features of the
    tokens processed since the last sync) and drafts with the cycle's own
    :func:`ltd.cycle.begin` and draft steps (nothing is verified or committed).
    """
    from ltd.cycle import DecodeState, begin

    prompt, output = list(prompt), list(output)
    P, N = len(prompt), len(output)
    if N < 2:
        return []
    full = prompt + output
    target.reset()
    drafter.reset()
    features = None
    if drafter.feature_layers is not None:
        out = target.score(full, list(range(-1, len(full) - 1)), drafter.feature_layers)
        features = out.features
        target.rollback()
    state = DecodeState(target, drafter, full[: P + 1], P)
    records = []
    for p in range(N - 1):
        state.tokens = full[: P + p + 1]
        feats = None
        if features is not None:
            feats = features[:P] if p == 0 else features[P + p - 1 : P + p]
        drafter.sync(state.tokens, feats)
        session = begin(state, topk, max_depth)
        cands = []
        signals = None
        while session.can_step:
            session.step()
            if signals is None:
                signals = session.signals()
            cands.append(session.last_scores.detach().clone())
        tree = session.finish()
        records.append(PositionRecord(tree, cands, list(session.step_seconds), signals))
    target.reset()
    drafter.reset()
    return records


def _prompt_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(list(tokens), dtype=np.int64).tobytes()).hexdigest()[:16]


def _sequence_file(index: int) -> str:
    return f"seq-{index:05d}.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")


def record(
    engine,
    prompts: Sequence[Prompt],
    *,
    max_depth: int,
    topk: int,
    max_new_tokens: int,
    out_dir: str | Path,
    max_size: int | None = None,
    keys: Sequence[str] | None = None,
    meta: dict | None = None,
    progress: bool = True,
) -> Path:
    """Record traces for ``prompts`` with an :class:`ltd.engine.Engine`.

    A prompt is token ids, or a :class:`~ltd.rl.prompts.FollowUp` (a later turn of a
    conversation, built from the outputs of the turns before it, which come earlier in
    ``prompts``). Each prompt's greedy output comes from the engine (method ``ar``); then
    :func:`record_sequence` drafts every position. Finished prompts (same key and
    tokens, file present) are skipped, so an interrupted run resumes. Returns the
    manifest path.
    """
    from tqdm import tqdm

    keys = _check_record_args(prompts, keys, max_depth, topk, max_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"max_depth": max_depth, "topk": topk, "max_new_tokens": max_new_tokens, "max_size": max_size}
    store = _TraceStore(out_dir, _open_manifest(out_dir / MANIFEST, config, engine, meta))
    bar = tqdm(total=len(prompts), desc="record traces", unit="prompt", disable=not progress)
    needed = {k for item in prompts if isinstance(item, FollowUp) for k in item.previous}
    outputs: dict[str, Sequence[int]] = {}  # greedy outputs a later turn follows
    for key, item in zip(keys, prompts):
        prompt = prompt_of(item, outputs)
        if store.is_done(key, prompt):
            output = store.output(key) if key in needed else None
        else:
            output, arrays, positions = _record_prompt(engine, prompt, config)
            store.save(key, prompt, output, arrays, positions)
        if key in needed:
            outputs[key] = output
        bar.update(1)
    bar.close()
    store.write_manifest()
    return store.manifest_path


def _check_record_args(prompts, keys, max_depth: int, topk: int, max_size: int | None) -> list[str]:
    """The keys to record under (one per prompt, unique); a one-line error for bad settings."""
    if max_depth < 1 or topk < 1:
        raise LtdError("--max-depth and --topk must be at least 1")
    if max_size is not None and max_size < 1:
        raise LtdError(f"--max-size must be at least 1, got {max_size}")
    keys = list(keys) if keys is not None else [f"prompt-{i}" for i in range(len(prompts))]
    if len(keys) != len(prompts) or len(set(keys)) != len(keys):
        raise ValueError("keys must be unique, one per prompt")
    return keys


def _record_prompt(engine, prompt: Sequence[int], config: dict) -> tuple[list[int], dict[str, np.ndarray], int]:
    """One prompt's greedy output (method ``ar``), its packed arrays and its decision points."""
    from ltd.engine import GenerateConfig

    max_depth, topk = config["max_depth"], config["topk"]
    res = engine.generate(list(prompt), GenerateConfig(method="ar", max_new_tokens=config["max_new_tokens"]))
    records = record_sequence(engine.backend, engine.drafter, prompt, res.tokens, max_depth=max_depth, topk=topk)
    arrays = pack_sequence(prompt, res.tokens, records, topk, max_depth, config["max_size"])
    return list(res.tokens), arrays, len(records)


class _TraceStore:
    """A trace directory being written: which prompts are done, and where the next one goes.

    Every finished sequence is saved, then the manifest rewritten (both atomically), so an
    interrupted run loses at most the prompt it was on."""

    def __init__(self, out_dir: Path, manifest: dict) -> None:
        self.out_dir = out_dir
        self.manifest = manifest
        self.done = {s["key"]: s for s in manifest["sequences"] if (out_dir / s["file"]).is_file()}
        manifest["sequences"] = list(self.done.values())
        self.next_index = 1 + max((int(s["file"][4:9]) for s in manifest["sequences"]), default=-1)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST

    def is_done(self, key: str, prompt: Sequence[int]) -> bool:
        """Whether ``key`` was recorded from these very tokens (then it is skipped)."""
        return key in self.done and self.done[key].get("prompt_sha") == _prompt_hash(prompt)

    def output(self, key: str) -> list[int]:
        """The recorded greedy output of a finished prompt."""
        with np.load(self.out_dir / self.done[key]["file"]) as data:
            return data["output"].tolist()

    def save(self, key: str, prompt: Sequence[int], output: Sequence[int], arrays: dict[str, np.ndarray], positions: int) -> None:
        entry = self.done.get(key)
        name = entry["file"] if entry else _sequence_file(self.next_index)
        if entry is None:
            self.next_index += 1
        _save_npz(self.out_dir / name, arrays)
        entry = {"key": key, "file": name, "prompt_sha": _prompt_hash(prompt), "prompt_tokens": len(prompt),
                 "output_tokens": len(output), "positions": positions}
        self.manifest["sequences"] = [s for s in self.manifest["sequences"] if s["key"] != key] + [entry]
        self.done[key] = entry
        self.write_manifest()

    def write_manifest(self) -> None:
        atomic_write_json(self.manifest_path, self.manifest)


def _open_manifest(manifest_path: Path, config: dict, engine, meta: dict | None) -> dict:
    """The manifest to resume (recorded with the same settings, else a one-line error) or a new one."""
    from ltd.machine import machine_info, utc_now

    if manifest_path.exists():
        manifest = read_json(manifest_path, "trace manifest")
        _check_manifest(manifest, manifest_path)
        old = {k: manifest.get(k) for k in config}
        if old != config:
            raise LtdError(f"traces in {manifest_path.parent} were recorded with {old}, not {config}; use another --out")
        return manifest
    return {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        **config,
        "created": utc_now(),
        "machine": machine_info(str(engine.backend.dtype).replace("torch.", ""), str(engine.backend.device)),
        **(meta or {}),
        "sequences": [],
    }


def _check_manifest(manifest: dict, where: Path) -> None:
    if manifest.get("format") != TRACE_FORMAT:
        raise LtdError(f"{where} is not an ltd trace manifest; record traces with ltd record")
    if int(manifest.get("version", -1)) != TRACE_VERSION:
        raise LtdError(f"{where} has trace version {manifest.get('version')}, this ltd reads {TRACE_VERSION}; re-record")


# -- a recorded set -----------------------------------------------------------------------


@dataclass
class TraceSet:
    """A directory of recorded sequences, loaded into memory."""

    directory: Path
    manifest: dict
    sequences: list[TraceSequence]

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def max_depth(self) -> int:
        return int(self.manifest["max_depth"])

    @property
    def max_size(self) -> int | None:
        v = self.manifest.get("max_size")
        return None if v is None else int(v)

    @property
    def num_positions(self) -> int:
        return sum(s.num_positions for s in self.sequences)

    @staticmethod
    def load(directory: str | Path, limit: int | None = None) -> "TraceSet":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise LtdError(f"no traces in {directory} (no {MANIFEST}); record them with ltd record")
        manifest = read_json(path, "trace manifest")
        _check_manifest(manifest, path)
        seqs = []
        for entry in manifest["sequences"][:limit]:
            f = directory / entry["file"]
            try:
                with np.load(f) as data:
                    arrays = {k: data[k] for k in data.files}
            except (OSError, ValueError) as exc:
                raise LtdError(f"trace file {f} is unreadable ({exc}); delete it and re-run ltd record to resume") from None
            seqs.append(TraceSequence(entry["key"], arrays, int(manifest["topk"]), int(manifest["max_depth"]), manifest.get("max_size")))
        if not any(s.num_positions for s in seqs):
            raise LtdError(f"traces in {directory} hold no decision points; record more or longer outputs")
        return TraceSet(directory, manifest, seqs)

    @staticmethod
    def from_sequences(sequences: Sequence[TraceSequence], topk: int, max_depth: int, max_size: int | None = None) -> "TraceSet":
        """An in-memory set (tests, hand-made traces)."""
        manifest = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "topk": topk, "max_depth": max_depth,
                    "max_size": max_size, "sequences": [{"key": s.key} for s in sequences]}
        return TraceSet(Path("."), manifest, list(sequences))
