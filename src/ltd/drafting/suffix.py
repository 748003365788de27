"""Suffix drafter: deep drafts from the longest earlier match of the context's suffix.

Copy-heavy work (editing code that is in the prompt, quoting a passage, revising an
earlier answer) repeats long spans, and there a model-free drafter is right 5-20 tokens
at a time. Following SuffixDecoding (arXiv 2411.04975), the drafter keeps

- a per-request memory over prompt and output, and
- optionally a global store of past outputs (``--online memory``), bounded by a token
  budget and evicted oldest request first, saved and restored with ``--online-state``.

Each cycle it finds the earlier occurrences of the longest suffix of the context (an
n-gram hash index gives candidates, a vector compare their match lengths), takes the
tokens that followed the most recent ones and builds a small trie best-first: a child's
probability is ``q(m + d) * count(child) / count(parent)``, the count share calibrated by
how often a match of that effective length is continued correctly (the n-gram drafter's
table, :data:`ltd.drafting.ngram.DEFAULT_RELIABILITY`), so the scores are probabilities
on the EAGLE-3 head's scale and a hybrid ranks both in one tree. The draft is capped at
``alpha * m`` tokens for an m-token match (at most ``max_depth``), and nodes whose path
probability falls below ``min_prob`` are pruned. The work per cycle is bounded by the
candidate, occurrence and node limits, not by the number of stored tokens. Runs where
every occurrence continues alike (copied text) are made in one go, and the cycle takes
the finished trie in one step (:meth:`SuffixDrafter.draft_tree`) rather than level by level.

After :meth:`SuffixDrafter.root` the drafter's :attr:`SuffixDrafter.stats` hold the
signals a policy needs (match length, count and probability of the best continuation,
depth reached, cumulative score).

The ``arctic-inference`` package holds SuffixDecoding's own C++ tree, but it is published
as a source distribution whose build needs CMake, nanobind and a CUDA-era torch, so this
is a numpy/Python implementation with the same rules.
"""

from __future__ import annotations

import contextlib
import threading

import heapq
import json
import logging
import math
from collections import deque
from itertools import islice
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ltd.drafting.base import TreeDraft, beam_flatten
from ltd.drafting.ngram import DEFAULT_RELIABILITY, PAD_TOKEN, SEP, reliability, trie_node_of
from ltd.errors import LtdError
from ltd.tree import Tree

log = logging.getLogger(__name__)

DEFAULT_STORE_TOKENS = 100_000
STORE_VERSION = 1
STORE_FILES = ("suffix_store.json", "suffix_store.safetensors")
_KEY_BITS = 32  # token ids are below 2**32; n-gram keys pack them into one int
_BACK = np.arange(1024)
_FIRST_SPAN = 8


@dataclass
class SuffixConfig:
    """Limits of the suffix drafter (SuffixDecoding's defaults where it has one)."""

    min_match: int = 2  # n of the hash index: shorter matches draft nothing
    max_match: int = 64  # longest match measured (alpha * max_match caps the depth)
    alpha: float = 1.0  # draft at most alpha * m tokens after an m-token match
    max_depth: int = 32  # and never deeper than this
    min_prob: float = 0.1  # prune nodes whose path probability is lower
    max_candidates: int = 64  # most recent index hits whose match length is measured
    max_matches: int = 32  # most recent longest-match occurrences merged into the trie
    max_nodes: int = 96  # best-first node budget of one cycle's trie
    store_tokens: int = DEFAULT_STORE_TOKENS  # global store budget (when it is on)
    reliabilities: tuple[float, ...] = DEFAULT_RELIABILITY

    def validate(self) -> None:
        if self.min_match < 1 or self.max_match < self.min_match or self.max_match > _BACK.size:
            raise LtdError(f"suffix drafter needs 1 <= min_match <= max_match <= {_BACK.size}, got {self.min_match} and {self.max_match}")
        if self.alpha <= 0 or self.max_depth < 1 or not 0.0 <= self.min_prob < 1.0:
            raise LtdError("suffix drafter needs alpha > 0, max_depth >= 1 and 0 <= min_prob < 1")
        if min(self.max_candidates, self.max_matches, self.max_nodes) < 1:
            raise LtdError("suffix drafter limits (candidates, matches, nodes) must be >= 1")
        if not self.reliabilities or not all(0.0 < q <= 1.0 for q in self.reliabilities):
            raise LtdError(f"suffix drafter reliabilities must be probabilities in (0, 1], got {list(self.reliabilities)}")
        if self.store_tokens < 16:
            raise LtdError(f"the suffix store needs a budget of at least 16 tokens, got {self.store_tokens}")


@dataclass
class SuffixStats:
    """What the last root draft saw: the signals of the adaptive policies."""

    match_length: int = 0  # tokens of the context's suffix matched (0: no match)
    source: str = ""  # "context" or "store" (where the match was found)
    occurrences: int = 0  # occurrences merged into the trie
    best_count: int = 0  # occurrences continuing with the best first token
    best_prob: float = 0.0  # its probability, q(m) * best_count / occurrences
    depth: int = 0  # deepest node of the trie
    score: float = float("-inf")  # cumulative log-probability at the end of the best chain
    chain: int = 0  # length of the best chain (top child at every level)


class SuffixNode:
    """One trie node: the rows (occurrences) through it and its children by token."""

    __slots__ = ("rows", "depth", "logp", "cum", "children", "_ranked")

    def __init__(self, rows: list[int], depth: int = 0, logp: float = 0.0, cum: float = 0.0) -> None:
        self.rows = rows
        self.depth = depth
        self.logp = logp  # this node's own log-probability given its parent
        self.cum = cum  # path log-probability from the match
        self.children: dict[int, SuffixNode] = {}
        self._ranked: tuple[int, list[tuple[int, float, SuffixNode]]] | None = None

    def ranked(self, k: int) -> list[tuple[int, float, "SuffixNode"]]:
        """The (at most k) best children as (token, log-prob, node), most frequent first."""
        known = self._ranked
        if known is not None and (known[0] == k or known[0] == 0):
            return known[1]
        kids = self.children.items()
        if len(kids) > 1:
            kids = sorted(kids, key=lambda kv: -len(kv[1].rows))[:k]  # stable: most recent first on ties
        ranked = [(t, c.logp, c) for t, c in kids]
        self._ranked = (k if len(ranked) > 1 else 0, ranked)  # 0: the same for every k
        return ranked


def _keys(values: Sequence[int], n: int) -> list[int | None]:
    """The n-gram key ending at each position (None where fewer than n tokens or a SEP)."""
    keys: list[int | None] = [None] * len(values)
    for i in range(n - 1, len(values)):
        key = 0
        for t in values[i - n + 1 : i + 1]:
            if t < 0:
                key = None
                break
            key = (key << _KEY_BITS) | t
        keys[i] = key
    return keys


class TokenIndex:
    """Tokens with an n-gram hash index of where each n-gram ends; append at the back,
    evict at the front. Positions are absolute (they survive evictions)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.buf = np.empty(1024, dtype=np.int64)
        self.size = 0
        self.base = 0  # absolute position of buf[0]
        self.positions: dict[int, deque[int]] = {}
        self.entries = 0  # index entries (bounded by size)

    def __len__(self) -> int:
        return self.size

    def tokens(self) -> np.ndarray:
        return self.buf[: self.size]

    def extend(self, tokens: Sequence[int]) -> None:
        new = len(tokens)
        if not new:
            return
        if self.size + new > self.buf.size:
            grown = np.empty(max(2 * self.buf.size, self.size + new), dtype=np.int64)
            grown[: self.size] = self.buf[: self.size]
            self.buf = grown
        self.buf[self.size : self.size + new] = tokens
        start = max(0, self.size - (self.n - 1))
        window = self.buf[start : self.size + new].tolist()
        keys = _keys(window, self.n)
        first = self.size - start  # keys of already indexed positions are skipped
        for i in range(first, len(window)):
            key = keys[i]
            if key is not None:
                self.positions.setdefault(key, deque()).append(self.base + start + i)
                self.entries += 1
        self.size += new

    def drop_front(self, count: int) -> None:
        """Forget the oldest ``count`` tokens and their index entries."""
        count = min(count, self.size)
        if count <= 0:
            return
        # n-grams ending in the first n - 1 kept tokens start in the evicted ones: drop them too
        keys = _keys(self.buf[: min(count + self.n - 1, self.size)].tolist(), self.n)
        for i, key in enumerate(keys):
            if key is None:
                continue
            dq = self.positions[key]
            popped = dq.popleft()  # positions are appended in order: the oldest is in front
            assert popped == self.base + i
            self.entries -= 1
            if not dq:
                del self.positions[key]
        self.buf = self.buf[count : self.size].copy()
        self.size -= count
        self.base += count

    def longest(self, ctx: np.ndarray, cfg: SuffixConfig, own: bool) -> tuple[int, np.ndarray]:
        """(m, ends): the longest match of ctx's suffix and its most recent end positions
        (relative to ``buf``). ``own``: ctx is this index's own tokens, so its last
        position (the suffix itself) is no occurrence."""
        n = self.n
        if ctx.size < n or self.size == 0:
            return 0, np.zeros(0, dtype=np.int64)
        tail = ctx[-n:].tolist()
        if min(tail) < 0:
            return 0, np.zeros(0, dtype=np.int64)
        key = 0
        for t in tail:
            key = (key << _KEY_BITS) | t
        hits = self.positions.get(key)
        if not hits:
            return 0, np.zeros(0, dtype=np.int64)
        take = min(cfg.max_candidates + 1, len(hits))
        ends = np.fromiter(islice(reversed(hits), take), dtype=np.int64, count=take) - self.base  # most recent first
        ends = ends[ends < (ctx.size - 1 if own else self.size - 1)][: cfg.max_candidates]  # an occurrence needs a next token
        if ends.size == 0:
            return 0, ends
        span = min(cfg.max_match, int(ctx.size))
        # two stages: most candidates of a short match fail within a few tokens, so only
        # the survivors of the first _FIRST_SPAN are compared over the whole span
        lengths = self._match_lengths(ctx, ends, min(span, _FIRST_SPAN))
        if span > _FIRST_SPAN:
            full = lengths == _FIRST_SPAN
            if full.any():
                lengths[full] = self._match_lengths(ctx, ends[full], span)
        m = int(lengths.max())
        return m, ends[lengths == m][: cfg.max_matches]

    def _match_lengths(self, ctx: np.ndarray, ends: np.ndarray, span: int) -> np.ndarray:
        back = _BACK[:span]
        pos = ends[:, None] - back
        early = int(ends.min()) < span - 1  # some occurrence starts less than span tokens in
        eq = self.buf[np.maximum(pos, 0) if early else pos] == ctx[ctx.size - 1 - back]
        if early:
            eq &= pos >= 0
        return np.where(eq.all(axis=1), span, eq.argmin(axis=1))

    def rows(self, ends: np.ndarray, length: int) -> tuple[list[list[int]], np.ndarray]:
        """The ``length`` tokens after each end, cut at a separator or the end of the buffer;
        and the same as one [ends, length] array, whose cut positions hold separators first."""
        pos = ends[:, None] + 1 + np.arange(length)[None, :]
        window = np.where(pos < self.size, self.buf[np.minimum(pos, self.size - 1)], SEP)
        out = []
        for row in window.tolist():
            if SEP in row:
                row = row[: row.index(SEP)]
            out.append(row)
        return out, window


class SuffixStore:
    """Past outputs of served requests, at most ``budget`` tokens (separators included);
    the oldest request goes first when a new one does not fit."""

    def __init__(self, budget: int = DEFAULT_STORE_TOKENS, n: int = SuffixConfig.min_match) -> None:
        if budget < 16:
            raise LtdError(f"the suffix store needs a budget of at least 16 tokens, got {budget}")
        self.budget = budget
        self.index = TokenIndex(n)
        self.lengths: deque[int] = deque()  # tokens of each stored request, separator included
        self.requests = 0  # requests stored so far (evicted ones included)
        # held while a request is added and while a drafter reads matches out of the store:
        # sequences decoded together (batching) share one store across threads
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def add(self, sequence: Sequence[int]) -> None:
        """Store one request's output; evict the oldest requests while over budget."""
        seq = [int(t) for t in sequence][-(self.budget - 1) :]
        if len(seq) < 2:
            return
        self.index.extend([SEP] + seq)
        self.lengths.append(len(seq) + 1)
        self.requests += 1
        while len(self.index) > self.budget:
            self.index.drop_front(self.lengths.popleft())

    # -- persistence (files inside an online state directory) ----------------------------
    def write_files(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tokens = torch.from_numpy(self.index.tokens().copy())
        lengths = torch.tensor(list(self.lengths), dtype=torch.int64)
        save_file({"tokens": tokens, "lengths": lengths}, str(directory / STORE_FILES[1]))
        meta = {"version": STORE_VERSION, "budget": self.budget, "n": self.index.n, "requests": self.requests}
        (directory / STORE_FILES[0]).write_text(json.dumps(meta, indent=2))

    def read_files(self, directory: Path) -> None:
        """Restore a saved store; a corrupt or foreign one is refused with the reset command."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        fix = f"reset it with: ltd online reset {directory}"
        if not (directory / STORE_FILES[0]).is_file():
            return  # a state saved without a suffix store: start empty
        try:
            meta = json.loads((directory / STORE_FILES[0]).read_text())
            saved = load_file(str(directory / STORE_FILES[1]))
            tokens, lengths = saved["tokens"], saved["lengths"]
            version, n, requests = meta["version"], meta["n"], int(meta.get("requests", 0))
        except (json.JSONDecodeError, OSError, SafetensorError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LtdError(f"suffix store in {directory} is corrupt ({type(exc).__name__}); {fix}") from None
        if version != STORE_VERSION or n != self.index.n:
            raise LtdError(f"suffix store in {directory} was made by another version or index; {fix}")
        flat, sizes = tokens.tolist(), lengths.tolist()
        if tokens.dim() != 1 or lengths.dim() != 1 or sum(sizes) != len(flat) or any(s < 3 for s in sizes):
            raise LtdError(f"suffix store in {directory} is corrupt (lengths do not add up); {fix}")
        fresh = SuffixStore(self.budget, self.index.n)
        start = 0
        for size in sizes:
            chunk = flat[start : start + size]
            if chunk[0] != SEP or min(chunk[1:]) < 0:
                raise LtdError(f"suffix store in {directory} is corrupt (bad separators); {fix}")
            fresh.add(chunk[1:])
            start += size
        self.index, self.lengths, self.requests = fresh.index, fresh.lengths, max(requests, fresh.requests)
        log.info("suffix store: restored %d tokens (%d requests) from %s", len(self), len(self.lengths), directory)


class SuffixDrafter:
    """Drafts a deep, count-scored trie from the context's longest earlier match."""

    feature_layers = None

    def __init__(self, config: SuffixConfig | None = None) -> None:
        self.config = config or SuffixConfig()
        self.config.validate()
        self.reliabilities = tuple(float(q) for q in self.config.reliabilities)
        # log q(m') for every effective match length a trie can reach (m' = 1, 2, ...)
        self._logq = [math.log(reliability(self.reliabilities, i)) for i in range(1, self.config.max_match + self.config.max_depth + 1)]
        self.store: SuffixStore | None = None  # the global store, on with enable_store()
        self.stats = SuffixStats()
        self._context = TokenIndex(self.config.min_match)
        self._tokens: list[int] = []
        self._prompt_length: int | None = None
        self._remembered = True
        self._trie: SuffixNode | None = None
        self._memo: dict[int, SuffixNode | None] = {}
        self._pad: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def last_match_length(self) -> int:
        return self.stats.match_length

    def fork(self) -> "SuffixDrafter":
        """A drafter for another sequence decoded at the same time: its own context
        memory, the same configuration and the same global store."""
        twin = SuffixDrafter(self.config)
        twin.store = self.store
        return twin

    def enable_store(self, budget: int | None = None) -> SuffixStore:
        """Turn on the cross-request store of past outputs (``--online memory``)."""
        if self.store is None:
            self.store = SuffixStore(budget or self.config.store_tokens, self.config.min_match)
        return self.store

    def remember(self) -> None:
        """Give the finished request's output to the global store (once per request)."""
        if self.store is not None and not self._remembered and self._prompt_length is not None:
            with self.store.lock:
                self.store.add(self._tokens[self._prompt_length :])
        self._remembered = True

    def reset(self) -> None:
        self.remember()
        self._remembered = False
        self._context = TokenIndex(self.config.min_match)
        self._tokens = []
        self._prompt_length = None
        self.stats = SuffixStats()
        self.end()

    def sync(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        known = len(self._tokens)
        if len(tokens) < known or list(tokens[: min(known, 8)]) != self._tokens[: min(known, 8)]:
            self._context = TokenIndex(self.config.min_match)  # not a continuation: start over
            known = 0
            self._tokens = []
        if self._prompt_length is None:
            self._prompt_length = max(len(tokens) - 1, 0)  # the first sync holds prompt + pending
        new = list(tokens[known:])
        self._tokens.extend(new)
        self._context.extend(new)

    def _match(self) -> tuple[TokenIndex | None, int, np.ndarray, str]:
        cfg = self.config
        ctx = self._context.tokens()
        m, ends = self._context.longest(ctx, cfg, own=True)
        index, source = self._context, "context"
        if self.store is not None and len(self.store) and m < min(cfg.max_match, ctx.size):  # else the store cannot match longer
            m_store, ends_store = self.store.index.longest(ctx, cfg, own=False)
            if m_store > m:  # the request's own text wins ties
                index, m, ends, source = self.store.index, m_store, ends_store, "store"
        if m == 0 or ends.size == 0:
            return None, 0, ends, ""
        return index, m, ends, source

    def _build(self, rows: list[list[int]], window: np.ndarray, m: int, depth: int) -> tuple[SuffixNode, SuffixStats]:
        """The trie over ``rows`` (``window``: the same as an array, see :meth:`TokenIndex.rows`),
        expanded best-first by path probability."""
        cfg = self.config
        floor = math.log(cfg.min_prob) if cfg.min_prob > 0 else -math.inf
        logq = self._logq[m - 1 : m - 1 + depth]
        root = SuffixNode(list(range(len(rows))))
        heap: list[tuple[float, int, SuffixNode]] = [(0.0, 0, root)]
        made, deepest = 0, 0
        while heap and made < cfg.max_nodes:
            node = heapq.heappop(heap)[2]
            d = node.depth
            if d >= depth:
                continue
            if len(node.rows) == 1:  # one occurrence: a chain, no branching to rank
                members = node.rows
                row = rows[members[0]]
                stop = min(depth, len(row), d + cfg.max_nodes - made)
                start = d
                while d < stop:
                    cum = node.cum + logq[d]
                    if cum < floor:
                        break
                    child = node.children[row[d]] = SuffixNode(members, d + 1, logq[d], cum)
                    node._ranked = (0, [(row[d], logq[d], child)])  # an only child: ranked for every k
                    node, d = child, d + 1
                made += d - start
                deepest = max(deepest, d)
                continue
            run = self._run(node, window, d, depth)
            if run is not None:
                # the occurrences still running all continue alike: a run of only children,
                # made at once while it stays the best-first choice (some occurrences may end)
                tokens, alive, counts = run
                best_other = -heap[0][0] if heap else -math.inf
                stop = min(d + len(tokens), d + cfg.max_nodes - made)
                start, base, members, j = d, node.rows, node.rows, 0
                while d < stop:
                    share, previous = counts[j], len(members)
                    logp = logq[d] + (math.log(share / previous) if share != previous else 0.0)
                    cum = node.cum + logp
                    if cum < floor:
                        break
                    if share != previous:  # some occurrences ended here
                        members = [r for r, keep in zip(base, alive[:, j].tolist()) if keep]
                    child = node.children[tokens[j]] = SuffixNode(members, d + 1, logp, cum)
                    node._ranked = (0, [(tokens[j], logp, child)])
                    node, d, j = child, d + 1, j + 1
                    if cum <= best_other or share == 1:  # a node in the heap comes first (ties: the older one)
                        break
                made += d - start
                deepest = max(deepest, d)
                if d > start:
                    heapq.heappush(heap, (-node.cum, made, node))
                continue
            groups: dict[int, list[int]] = {}
            for r in node.rows:
                row = rows[r]
                if d < len(row):
                    groups.setdefault(row[d], []).append(r)
            total = len(node.rows)
            for tok, members in groups.items():
                logp = logq[d] + (math.log(len(members) / total) if len(members) != total else 0.0)
                cum = node.cum + logp
                if cum < floor or made >= cfg.max_nodes:
                    continue
                child = SuffixNode(members, d + 1, logp, cum)
                node.children[tok] = child
                made += 1
                deepest = max(deepest, d + 1)
                heapq.heappush(heap, (-cum, made, child))
        stats = SuffixStats(match_length=m, occurrences=len(rows), depth=deepest)
        if root.children:
            best = max(root.children.values(), key=lambda c: len(c.rows))
            stats.best_count, stats.best_prob = len(best.rows), math.exp(best.logp)
            node, chain = root, 0
            while node.children:
                kids = node.children
                node = next(iter(kids.values())) if len(kids) == 1 else max(kids.values(), key=lambda c: len(c.rows))
                chain += 1
            stats.chain, stats.score = chain, node.cum
        return root, stats

    def _draft_trie(self) -> None:
        """This cycle's trie (None without a match) and its stats."""
        with self.store.lock if self.store is not None else contextlib.nullcontext():
            index, m, ends, source = self._match()
            if index is not None:
                depth = min(self.config.max_depth, max(1, math.ceil(self.config.alpha * m)))
                rows, window = index.rows(ends, depth)
        self._trie = None
        if index is not None:
            self._trie, self.stats = self._build(rows, window, m, depth)
            self.stats.source = source
        else:
            self.stats = SuffixStats()
        self._memo = {0: self._trie}

    @staticmethod
    def _run(node: SuffixNode, window: np.ndarray, d: int, depth: int) -> tuple[list[int], np.ndarray, list[int]] | None:
        """How far a node's occurrences continue alike from depth ``d``: (the tokens,
        [occurrences, tokens] whether each occurrence is still running, how many are),
        None when they branch at once. An occurrence ends at its first separator."""
        sub = window[node.rows, d:depth]
        alive = np.logical_and.accumulate(sub >= 0, axis=1)
        tokens = np.where(alive, sub, -1).max(axis=0)  # the token of the running ones, where they agree
        same = (~alive | (sub == tokens)).all(axis=0) & (tokens >= 0)
        run = same.size if same.all() else int(same.argmin())
        if not run:
            return None
        return tokens[:run].tolist(), alive[:, :run], alive[:, :run].sum(axis=0).tolist()

    def root(self, tree: Tree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._draft_trie()
        toks, logps = self._candidates([0], k)
        return toks[0], logps[0]

    def draft_tree(self, k: int, max_depth: int) -> TreeDraft:
        """The whole trie at once (see :class:`ltd.drafting.base.WholeTreeDrafter`)."""
        self._draft_trie()
        return beam_flatten(self._trie, SuffixNode.ranked, k, min(max_depth, self.stats.depth))

    def _padding(self, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Fresh [rows, k] candidate arrays holding only padding (copies of a cached template)."""
        if self._pad is None or self._pad[0].shape[1] != k or self._pad[0].shape[0] < rows:
            size = max(rows, 8)
            self._pad = (np.full((size, k), PAD_TOKEN, dtype=np.int64), np.full((size, k), -np.inf, dtype=np.float32))
        return self._pad[0][:rows].copy(), self._pad[1][:rows].copy()

    def _candidates(self, nodes: list[int], k: int, tree: Tree | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        toks, logps = self._padding(len(nodes), k)
        for i, node in enumerate(nodes):
            found = self._memo.get(node) if tree is None else trie_node_of(tree, node, self._memo)
            if found is not None and found.children:
                for j, (t, lp, _) in enumerate(found.ranked(k)):
                    toks[i, j] = t
                    logps[i, j] = lp
        return torch.from_numpy(toks), torch.from_numpy(logps)

    def expand(self, tree: Tree, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = nodes.tolist()
        if self._trie is None or not ids or int(tree.depths[ids[0]]) >= self.stats.depth:
            # below the trie's deepest level (frontiers are one level): nothing to look up
            if all(int(tree.depths[i]) >= self.stats.depth for i in ids):
                toks, logps = self._padding(len(ids), k)
                return torch.from_numpy(toks), torch.from_numpy(logps)
        return self._candidates(ids, k, tree)

    def end(self) -> None:
        self._trie = None
        self._memo = {}


def suffix_stats(drafter) -> SuffixStats | None:
    """The suffix signals of a drafter (itself or a hybrid's first half), None if it has none."""
    part = getattr(drafter, "ngram", drafter)
    return getattr(part, "stats", None) if isinstance(part, SuffixDrafter) else None


# The suffix signals as one vector (raw values), in this order: what the cycle shows the
# controllers after the root step and what traces record, so replay and live agree.
SIGNAL_FIELDS = ("match_length", "occurrences", "best_prob", "depth", "chain")


def drafter_signals(drafter) -> np.ndarray | None:
    """:data:`SIGNAL_FIELDS` of the drafter's last root draft, None for a drafter without a suffix trie."""
    stats = suffix_stats(drafter)
    if stats is None:
        return None
    return np.array([stats.match_length, stats.occurrences, stats.best_prob, stats.depth, stats.chain], dtype=np.float32)


def parse_suffix_spec(spec: str) -> SuffixDrafter:
    """``suffix`` or ``suffix:D`` (deepest draft D, default 32)."""
    _, _, arg = spec.partition(":")
    if not arg:
        return SuffixDrafter()
    if not arg.isdigit() or int(arg) < 1:
        raise LtdError(f"bad drafter {spec!r}: write suffix or suffix:D with D the deepest draft, e.g. suffix:48")
    return SuffixDrafter(SuffixConfig(max_depth=int(arg)))
