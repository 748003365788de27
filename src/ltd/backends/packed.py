"""Continuous batching on the transformers backend: several sequences in one forward.

Why: on a CPU one forward over 4 rows costs little more than over 1 (the weights are read
once either way), so requests decoded together share that cost; every serving engine
users compare us with does this.

How, without touching the modeling code: the sequences (*lanes*) share one KV cache, in
which each lane owns a set of *slots*. Keys are cached after the rotary embedding, so a
slot's place in the cache carries no position: a lane's rows see exactly their own
committed slots and their own tree ancestors through one additive attention mask, the
same tree mask a single sequence uses, extended to a forest. Rejected drafts and
finished lanes leave dead slots; they are compacted away once they are many (or at once
when one lane is alone, which then keeps the plain causal fast path).

Who runs the forward: each lane is driven by its own thread running the ordinary cycle
(:func:`ltd.cycle.decode`), unchanged. :meth:`Lane.score` queues the lane's nodes and
waits; when every active lane has queued (or left), one of the waiting threads runs a
single forward for all of them and hands each lane its rows (on the process's compute
thread when a server made one: :class:`ltd.runtime.ComputeThread`). Lanes join and leave
between forwards.

Between forwards the lanes take turns (:attr:`PackedHF.turn`): a lane holds the turn from
the moment its rows come back until it queues again, so only one lane's Python (drafting,
acceptance, bookkeeping) runs at a time. On a CPU the work is serial anyway (one lane's
draft step already uses every core), and without turns the threads fight over the GIL:
each small torch op releases it, and taking it back from a busy thread waits for the
interpreter's switch interval (5 ms), many times per cycle. A lane's greedy output equals its output decoded alone (to the
rounding of a wider matrix product, as tree verification already is).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ltd import cache_ops
from ltd.backends.base import SpeculativeCounters, TreeOutput
from ltd.backends.hf import HFBackend
from ltd.errors import LtdError
from ltd.runtime import on_compute_thread
from ltd.tree import ancestor_mask

log = logging.getLogger(__name__)

COMPACT_MIN_DEAD = 64  # dead slots tolerated before compacting (several lanes)
COMPACT_DEAD_FRACTION = 0.25  # ... or this share of the cache
TOKENS_EMA = 0.1  # weight of a lane's newest cycle in the batch's means (tokens, rows per cycle)


@dataclass
class BatchLoad:
    """What a lane's controller can know about the batch it is in, this cycle."""

    active: int  # lanes decoding now, this one included
    queued: int  # lanes whose nodes already wait for the next forward
    queued_rows: int  # rows those lanes claimed
    slots: int = 0  # cache entries every row attends over (masked), all lanes together
    mean_tokens: float = 1.0  # tokens a lane's cycle committed lately (accepted drafts + bonus)
    mean_rows: float = 1.0  # rows a lane's cycle asked the forward for lately (prefills left out)
    mean_work_seconds: float = 0.0  # a lane's own work between two forwards lately (drafting, acceptance)


@dataclass
class _Request:
    lane: "Lane"
    tokens: list[int]
    parents: list[int]
    depths: list[int]
    feature_layers: tuple[int, ...] | None
    last_only: bool
    result: TreeOutput | None = None
    error: BaseException | None = None
    slots: list[int] = field(default_factory=list)


class PackedHF:
    """One transformers model and one shared cache serving many :class:`Lane` s."""

    def __init__(self, backend: HFBackend, max_lanes: int = 8) -> None:
        if max_lanes < 1:
            raise LtdError(f"--max-batch must be at least 1, got {max_lanes}")
        self.backend = backend
        self.max_lanes = max_lanes
        self.cache = cache_ops.new_cache(backend.config)
        if any(type(layer) is not cache_ops.PreallocatedLayer for layer in self.cache.layers):
            raise LtdError("this model has sliding-window or other non-global attention layers, which batching does not support; use --max-batch 1")
        self._length = 0  # slots in the cache, live or dead
        self._dead = 0
        self._cond = threading.Condition(threading.Lock())
        self._lanes: list[Lane] = []
        self._queued: list[_Request] = []
        self._running = False
        self.turn = threading.Lock()  # held by the one lane doing its own work between forwards
        self.forwards = 0  # forwards run, and rows scored in them (for metrics)
        self.rows = 0
        self.forward_seconds = 0.0  # inside the forwards (the rest of a cycle is drafting and bookkeeping)
        self.mean_tokens = 1.0  # running mean of the tokens a lane's cycle commits
        self.mean_rows = 1.0  # running mean of the rows a lane's cycle scores
        self.mean_work_seconds = 0.0  # running mean of a lane's work between forwards (it holds the turn)

    # -- lanes ---------------------------------------------------------------------------
    def lane(self) -> "Lane":
        """A new sequence in the batch; close it (or use it as a context manager) when done."""
        with self._cond:
            if len(self._lanes) >= self.max_lanes:
                raise LtdError(f"the batch already holds {self.max_lanes} sequences; close one first")
            lane = Lane(self)
            self._lanes.append(lane)
        return lane

    def load(self) -> BatchLoad:
        with self._cond:
            return BatchLoad(len(self._lanes), len(self._queued), sum(len(r.tokens) for r in self._queued),
                             self._length - self._dead, self.mean_tokens, self.mean_rows, self.mean_work_seconds)

    @property
    def active(self) -> int:
        return len(self._lanes)

    def _leave(self, lane: "Lane") -> None:
        with self._cond:
            if lane in self._lanes:
                self._lanes.remove(lane)
            self._drop(len(lane.slots) + len(lane.spec_slots))
            lane.slots, lane.spec_slots = [], []
            self._cond.notify_all()  # the waiting lanes may now be all there is

    def _committed(self, tokens: int) -> None:
        """Called with the lock held after a lane's cycle committed ``tokens`` tokens."""
        self.mean_tokens += TOKENS_EMA * (tokens - self.mean_tokens)

    def _worked(self, seconds: float) -> None:
        """A lane held the turn for ``seconds`` between two forwards of a cycle."""
        with self._cond:
            self.mean_work_seconds += TOKENS_EMA * (seconds - self.mean_work_seconds)

    def _drop(self, count: int) -> None:
        """Called with the lock held: ``count`` slots just died (compaction reclaims them)."""
        self._dead += count

    # -- the barrier ---------------------------------------------------------------------
    def _submit(self, req: _Request) -> TreeOutput:
        req.lane._end_turn()
        try:
            return self._wait_for(req)
        finally:
            req.lane._take_turn()

    def _wait_for(self, req: _Request) -> TreeOutput:
        with self._cond:
            self._queued.append(req)
            self._cond.notify_all()
            while req.result is None and req.error is None:
                if not self._running and self._queued and len(self._queued) >= len(self._lanes):
                    self._lead()
                else:
                    self._cond.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _lead(self) -> None:
        """Called with the lock held: run one forward for every queued lane. The lock is
        released during the forward, so lanes may join meanwhile (their nodes wait for the
        next one); the lanes in this forward are all blocked in :meth:`_submit`."""
        batch, self._queued = self._queued, []
        self._running = True
        self._compact_if_due()
        self._cond.release()
        try:
            on_compute_thread(self._score_all, batch)
        except BaseException as exc:  # every lane of the batch sees the failure
            for req in batch:
                req.error = exc
        finally:
            self._cond.acquire()
            self._running = False
            self._cond.notify_all()

    # -- the forward ---------------------------------------------------------------------
    @torch.inference_mode()
    def _score_all(self, batch: list[_Request]) -> None:
        b = self.backend
        toks = [t for r in batch for t in r.tokens]
        offset = self._length
        for r in batch:  # new entries go after every slot in use, in batch order
            r.slots = list(range(offset, offset + len(r.tokens)))
            offset += len(r.tokens)
        positions = torch.tensor(
            [[r.lane.committed_length + d for r in batch for d in r.depths]], dtype=torch.long, device=b.device
        )
        mask = self._mask(batch)
        keep = self._rows_to_keep(batch)
        wants = [r.feature_layers for r in batch if r.feature_layers is not None]
        t0 = time.perf_counter()
        out = b.forward(toks, positions, mask, self.cache, bool(wants), keep)
        self.forward_seconds += time.perf_counter() - t0
        self.forwards += 1
        self.rows += len(toks)
        for r in batch:
            if r.lane.committed_length:  # a cycle's verification, not a prefill
                self.mean_rows += TOKENS_EMA * (len(r.tokens) - self.mean_rows)
        self._hand_out(batch, out, keep)

    def _mask(self, batch: list[_Request]) -> torch.Tensor | None:
        """The forest mask [1, 1, rows, slots + rows]; None when one lane alone holds the
        whole cache in order and scores a chain (plain causal attention)."""
        b, start = self.backend, self._length
        if len(batch) == 1:
            r = batch[0]
            lane = r.lane
            if not lane.spec_slots and len(lane.slots) == start and r.parents == list(range(-1, len(r.tokens) - 1)):
                if lane.slots == list(range(start)):
                    return None
        rows = sum(len(r.tokens) for r in batch)
        mask = torch.full((rows, start + rows), torch.finfo(b.dtype).min, dtype=b.dtype, device=b.device)
        offset = 0
        for r in batch:
            n, lane = len(r.tokens), r.lane
            block = mask[offset : offset + n]
            if lane.slots:
                block[:, torch.tensor(lane.slots, dtype=torch.long, device=b.device)] = 0
            spec = len(lane.spec_slots)
            parents = torch.tensor(lane.spec_parents + r.parents, dtype=torch.long, device=b.device)
            anc = ancestor_mask(parents, check=False)[spec:]
            cols = torch.tensor(lane.spec_slots + r.slots, dtype=torch.long, device=b.device)
            sub = torch.full((n, spec + n), torch.finfo(b.dtype).min, dtype=b.dtype, device=b.device)
            block[:, cols] = sub.masked_fill_(anc, 0)
            offset += n
        return mask.view(1, 1, rows, start + rows)

    @staticmethod
    def _rows_to_keep(batch: list[_Request]) -> int | torch.Tensor:
        """The rows whose logits anyone needs: 0 (all) unless a lane asked for its last
        row only (a prefill), whose other rows would cost a vocabulary-wide product each."""
        if not any(r.last_only for r in batch):
            return 0
        keep, offset = [], 0
        for r in batch:
            n = len(r.tokens)
            keep.extend([offset + n - 1] if r.last_only else range(offset, offset + n))
            offset += n
        return torch.tensor(keep, dtype=torch.long)

    def _hand_out(self, batch: list[_Request], out, keep: int | torch.Tensor) -> None:
        logits = out.logits[0].float()
        hidden = out.hidden_states
        offset, row = 0, 0
        for r in batch:
            n = len(r.tokens)
            kept = 1 if r.last_only and not isinstance(keep, int) else n
            features = None
            if r.feature_layers is not None:
                features = torch.cat([hidden[i][0, offset : offset + n] for i in r.feature_layers], dim=-1)
            r.lane.spec_slots.extend(r.slots)
            r.lane.spec_parents.extend(r.parents)
            r.lane.spec_depths.extend(r.depths)
            r.result = TreeOutput(logits=logits[row : row + kept], features=features)
            offset += n
            row += kept
        self._length += offset

    # -- compaction ----------------------------------------------------------------------
    def _compact_if_due(self) -> None:
        """Called with the lock held, before a forward: drop dead slots when they are many,
        or at once when one lane is alone (it then keeps the cache in order)."""
        if self._dead == 0:
            return
        alone = len(self._lanes) <= 1
        if not alone and self._dead < max(COMPACT_MIN_DEAD, COMPACT_DEAD_FRACTION * self._length):
            return
        live = sorted(s for lane in self._lanes for s in lane.slots + lane.spec_slots)
        first = next((i for i, s in enumerate(live) if s != i), len(live))
        if first < len(live):
            tail = torch.tensor(live[first:], dtype=torch.long) - first
            cache_ops.keep_positions(self.cache, first, tail)
        else:
            cache_ops.truncate(self.cache, len(live))
        remap = {s: i for i, s in enumerate(live)}
        for lane in self._lanes:
            lane.slots = [remap[s] for s in lane.slots]
            lane.spec_slots = [remap[s] for s in lane.spec_slots]
        self._length = len(live)
        self._dead = 0


class Lane(SpeculativeCounters):
    """One sequence of a :class:`PackedHF` batch, with the interface of a backend.

    The cycle drives it like any backend; only :meth:`score` waits for the batch.
    """

    def __init__(self, pool: PackedHF) -> None:
        b = pool.backend
        self.pool = pool
        self.vocab_size, self.max_context = b.vocab_size, b.max_context
        self.hidden_size, self.num_layers = b.hidden_size, b.num_layers
        self.kernel_plan = b.kernel_plan
        self.slots: list[int] = []  # cache slot of each committed position, in order
        self.spec_slots: list[int] = []
        self.spec_parents: list[int] = []
        self.spec_depths: list[int] = []
        self._committed = 0
        self.closed = False
        self._turn = False  # whether this lane holds the pool's turn
        self._turn_start = 0.0

    def _take_turn(self) -> None:
        if not self._turn and not self.closed:
            self.pool.turn.acquire()
            self._turn = True
            self._turn_start = time.perf_counter()

    def _end_turn(self) -> None:
        if self._turn:
            self._turn = False
            if self._committed:  # a cycle's work (a prompt's catch-up would skew the mean)
                self.pool._worked(time.perf_counter() - self._turn_start)
            self.pool.turn.release()

    # SpeculativeCounters reads these two names
    @property
    def _spec_parents(self) -> list[int]:
        return self.spec_parents

    @property
    def _spec_depths(self) -> list[int]:
        return self.spec_depths

    def load(self) -> BatchLoad:
        """The batch this lane decodes in (see :class:`BatchLoad`)."""
        return self.pool.load()

    def reset(self) -> None:
        self._check_open()
        self._take_turn()
        with self.pool._cond:
            self.pool._drop(len(self.slots) + len(self.spec_slots))
        self.slots, self.spec_slots, self.spec_parents, self.spec_depths = [], [], [], []
        self._committed = 0

    def score(
        self,
        tokens: Sequence[int] | torch.Tensor,
        parents: Sequence[int] | torch.Tensor,
        feature_layers: Sequence[int] | None = None,
        last_only: bool = False,
    ) -> TreeOutput:
        self._check_open()
        toks, pars, depths = self._check_nodes(tokens, parents)
        layers = tuple(feature_layers) if feature_layers is not None else None
        return self.pool._submit(_Request(self, toks, pars, depths, layers, last_only))

    def commit(self, keep: Sequence[int] | torch.Tensor) -> None:
        keep_l = self._check_path(keep)
        kept = [self.spec_slots[k] for k in keep_l]
        with self.pool._cond:
            self.pool._drop(len(self.spec_slots) - len(kept))
            if self._committed:  # a cycle (the prefill would skew the mean)
                self.pool._committed(len(kept))
        self.slots.extend(kept)
        self._committed += len(kept)
        self.spec_slots, self.spec_parents, self.spec_depths = [], [], []

    def rollback(self) -> None:
        with self.pool._cond:
            self.pool._drop(len(self.spec_slots))
        self.spec_slots, self.spec_parents, self.spec_depths = [], [], []

    def close(self) -> None:
        """Leave the batch and free this sequence's cache slots."""
        if not self.closed:
            self.closed = True
            self._end_turn()
            self.pool._leave(self)

    def _check_open(self) -> None:
        if self.closed:
            raise LtdError("this batch lane was closed; open a new one")

    def __enter__(self) -> "Lane":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
