"""kNN drafting memory: the head's own hidden states, labelled by the target's verdicts.

Gradient updates move the EAGLE-3 head's weights a little per update (and measured
1.00-1.05x); a domain the head never saw needs far more than that. A nearest-neighbour
memory (kNN-LM, Khandelwal et al. 2020, applied to the drafter) learns in one shot
instead. :class:`ltd.online.knn_drafter.KnnDrafter` wraps the head drafter with it. Every position the head
processes leaves its final hidden state (the vector ``lm_head`` scores); once the target
has committed the token two places on, that token is the label. When the head drafts
again, the stored states nearest to its current one vote for their labels, and the
draft distribution becomes ``(1 - w) * head + w * votes``.

The neighbours also say what came *after* their label: each stored position points into
a token stream of everything served (sequences separated by :data:`SEP`), and their
continuations, weighted by the votes, form a trie that drafts the deeper levels at no
model cost, like the n-gram drafter's but found by the head's state instead of an exact
suffix. A child's score is ``q(depth) * weight(child) / weight(parent)``, with q
re-learned from what the target committed (:class:`ltd.online.reliability.OnlineReliability`).

Below a first-level token the root's neighbours did not vote for (one the head or the
n-gram drafter proposed), their trie is empty; with the head drafting the root only
(``@1``) nothing would draft the second level unless the n-gram drafter matched. There the
drafted node asks the store itself: one head layer (no output layer) gives its state, and
its own neighbours' continuations fill the gap, scored by the same q(depth) and graded
the same way (``node_votes`` nodes per draft step, best-scored first; off by default, as
the head layer costs more than it gains on our CPU).

How far to trust the votes is learned too. The first drafted token of every cycle is
graded by the target's next committed token, and the votes' share ``w`` follows the EM
update of a two-component mixture: the running mean of the responsibility
``w p_votes(y) / (w p_votes(y) + (1 - w) p_head(y))``, kept per bin of the nearest
neighbour's similarity (a near-duplicate context deserves more trust than a far one)
with a prior of ``weight`` worth 20 trials. When the stream changes domain, the old
domain's neighbours stop predicting and their share falls.

Neighbours must share the token the head entry read (``x_{j+1}``, the node being
expanded). Why: the hidden state already encodes that token, so neighbours almost always
share it anyway, and restricting to it turns a search over the whole store into a search
over one token's bucket (a vector compare over the store, then a small matmul), cheap
enough for every cycle on a CPU.

The store spans requests (the stream so far, the current request included), so the
drafter learns a user's domain as it serves. On humaneval (80 prompts, SmolLM2-135M,
shipped head) the votes raised prequential step-1 agreement with the target from 32% to
66% in an offline replay. Live, much of that overlaps what the
n-gram drafter already copies from the context: 1.05x accepted tokens per cycle on
a 24-prompt humaneval stream at 3x8x3 (``benchmarks/online-knn-24prompts-2026-11-27``), 1.11x over all 80
humaneval prompts and on gsm8k after them (``benchmarks/online-knn-80prompts-2026-11-28``), while on general questions
the retrieved continuations cost 1.7% (``benchmarks/knn-settings-16prompts-2026-11-28``). It changes
drafts only, never the output.

Keys depend on the head's weights: a store saved with one head is refused by another
(a fingerprint of the head is saved beside it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ltd.drafting.ngram import SEP, TrieNode, grade_trie, top_children
from ltd.errors import LtdError
from ltd.online.reliability import OnlineReliability

log = logging.getLogger(__name__)

KNN_VERSION = 2
# q(d): how often the top continuation at trie depth d (d = 1: the second drafted token) is
# the target's, before any evidence; re-learned online per depth
DEFAULT_CONTINUATION_RELIABILITY = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
# upper edges of the nearest-neighbour cosine similarity bins the votes' share is learned in
SIMILARITY_BINS = (0.5, 0.7, 0.8, 0.9, 0.95, 1.01)
WEIGHT_PRIOR_TRIALS = 20.0
KNN_FILES = ("knn.json", "knn.safetensors")


@dataclass
class KnnConfig:
    """kNN memory settings; defaults from an offline replay of humaneval answers, the temperature
    and node_votes from a live 80-prompt humaneval stream (benchmarks/knn-settings-80prompts-2026-11-28)."""

    capacity: int = 32768  # stored positions (the oldest go first)
    k: int = 16  # neighbours that vote
    temperature: float = 0.05  # softmax temperature over cosine similarities (benchmarks/knn-settings-80prompts-2026-11-28)
    weight: float = 0.5  # share of the votes in the draft distribution
    max_len: int = 8  # continuation tokens per neighbour in the retrieval trie
    learn_weight: bool = True  # re-learn the votes' share per similarity bin (EM), else keep ``weight``
    # deeper nodes the root's neighbours say nothing below that ask the store with their own
    # head state, per draft step (best-scored first). Off by default: on the 80-prompt
    # humaneval stream 2 gained 0.4% accepted (benchmarks/knn-settings-80prompts-2026-11-28) and cost ~1.7 ms
    # per cycle (a head layer and two more queries; a scratch profile), a loss
    # here; it may pay where the head is cheap
    node_votes: int = 0

    def validate(self) -> None:
        if self.capacity < 16 or self.k < 1 or self.temperature <= 0 or not 0.0 < self.weight <= 1.0 or self.max_len < 1 \
                or self.node_votes < 0:
            raise LtdError(
                "kNN memory needs capacity >= 16, k >= 1, temperature > 0, 0 < weight <= 1, max_len >= 1 and "
                f"node_votes >= 0, got {asdict(self)}"
            )


def head_fingerprint(head) -> str:
    """A short hash of the head's output layer: keys stored under one head mean nothing to another."""
    h = hashlib.sha256()
    for name in ("norm.weight", "lm_head.weight"):
        t = dict(head.named_parameters())[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def build_weighted_trie(continuations: Sequence[Sequence[int]], weights: Sequence[float], depth: int = 0) -> TrieNode:
    """Merge continuations into a trie whose counts are the summed weights of the paths through each node.

    ``depth`` is the root's: a retrieval at a drafted node of depth d roots its trie there,
    so q(depth) scores its continuations like the root trie's at the same tree depth.
    """
    root = TrieNode(depth=depth)
    for cont, w in zip(continuations, weights):
        if not cont:
            continue
        root.count += w
        node = root
        for tok in cont:
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = TrieNode(depth=node.depth + 1)
            child.count += w
            node = child
    return root


@dataclass
class Retrieval:
    """What the store says about one query: the votes for the next token and the trie of what followed."""

    labels: torch.Tensor  # target ids of the neighbours' labels
    weights: torch.Tensor  # their votes (sum 1)
    trie: TrieNode  # continuations from the label on, weighted by the votes
    similarity: float  # cosine similarity of the nearest neighbour


@dataclass
class _Drafted:
    """The first-level mixture of one root, kept until the target's token grades it."""

    head_probs: torch.Tensor  # the head's distribution over the draft vocabulary
    found: Retrieval
    bin: int
    weight: float


class _Bucket:
    """One read token's keys, contiguous, so a query is one matrix-vector product.

    Why: gathering a common token's rows out of the ring (``keys[rows]``) copied megabytes
    per query once the store held a few thousand of them (a 3130-row bucket: 0.76 ms per
    query with the gather, 0.17 ms with this index; a scratch micro-benchmark,
    1 thread). Rows are copies of ring entries; a row whose ring slot was overwritten
    is stale (its serial no longer matches the slot's) and is masked, then dropped when
    stale rows outnumber live ones.
    """

    def __init__(self, hidden_size: int) -> None:
        self.keys = torch.empty((16, hidden_size), dtype=torch.float32)
        self.slots = torch.empty(16, dtype=torch.long)
        self.serials = torch.empty(16, dtype=torch.long)
        self.n = 0  # rows in use
        self.live = 0  # rows whose entry is still in the ring

    def append(self, keys: torch.Tensor, slots: torch.Tensor, serials: torch.Tensor) -> None:
        m = keys.shape[0]
        if self.n + m > self.keys.shape[0]:
            cap = max(2 * self.keys.shape[0], self.n + m)
            self.keys = torch.cat([self.keys[: self.n], self.keys.new_empty((cap - self.n, self.keys.shape[1]))])
            self.slots = torch.cat([self.slots[: self.n], self.slots.new_empty(cap - self.n)])
            self.serials = torch.cat([self.serials[: self.n], self.serials.new_empty(cap - self.n)])
        self.keys[self.n : self.n + m] = keys
        self.slots[self.n : self.n + m] = slots
        self.serials[self.n : self.n + m] = serials
        self.n += m
        self.live += m

    def valid(self, ring_serials: torch.Tensor) -> torch.Tensor:
        """Which rows still hold their ring slot's entry."""
        return ring_serials[self.slots[: self.n]] == self.serials[: self.n]

    def compact(self, ring_serials: torch.Tensor) -> None:
        n, keep = self.n, self.valid(ring_serials)
        self.keys, self.slots, self.serials = self.keys[:n][keep], self.slots[:n][keep], self.serials[:n][keep]
        self.n = self.live = int(keep.sum())


class KnnMemory:
    """A ring buffer of (key, read token, label position) for head positions whose label is committed,
    beside the stream of served tokens the positions point into, with the keys also kept per read token."""

    def __init__(self, hidden_size: int, fingerprint: str, cfg: KnnConfig | None = None) -> None:
        self.cfg = cfg or KnnConfig()
        self.cfg.validate()
        self.hidden_size = hidden_size
        self.fingerprint = fingerprint
        cap = self.cfg.capacity
        self.keys = torch.zeros((cap, hidden_size), dtype=torch.float32)
        self.read = torch.full((cap,), -1, dtype=torch.long)  # x_{j+1}: the token the entry read
        self.pos = torch.zeros(cap, dtype=torch.long)  # stream position (absolute) of x_{j+2}, the label
        self.serial = torch.full((cap,), -1, dtype=torch.long)  # serial number of the entry in each slot
        self._serials = 0  # entries ever written (serial numbers handed out)
        self._buckets: dict[int, _Bucket] = {}  # read token -> its keys, contiguous
        self.size = 0
        self.next = 0  # ring position of the next write
        self.added = 0  # positions stored so far (overwritten ones included)
        self.stream: list[int] = []  # served tokens, SEP between sequences
        self.offset = 0  # absolute position of stream[0] (older tokens were trimmed)
        self._seq_start = 0  # absolute position of the current sequence's first token
        self._seq_len = 0  # tokens of the current sequence in the stream
        self._waiting: list[tuple[int, torch.Tensor]] = []  # (entry j, key) whose label is not committed yet
        self.reliability = OnlineReliability(DEFAULT_CONTINUATION_RELIABILITY)
        self.weight_resp = torch.zeros(len(SIMILARITY_BINS), dtype=torch.float64)  # summed responsibilities
        self.weight_trials = torch.zeros(len(SIMILARITY_BINS), dtype=torch.float64)
        self._drafted: _Drafted | None = None

    def __len__(self) -> int:
        return self.size

    @property
    def labels(self) -> torch.Tensor:
        """The label (target id) of every slot."""
        return torch.tensor([self._token_at(int(p)) for p in self.pos[: self.size]], dtype=torch.long)

    def _token_at(self, position: int) -> int:
        i = position - self.offset
        return self.stream[i] if 0 <= i < len(self.stream) else SEP

    # -- learning ----------------------------------------------------------------------
    @staticmethod
    def keys_of(normed_hidden: torch.Tensor) -> torch.Tensor:
        """Unit-length float32 keys from the head's normed hidden states (the rows ``lm_head`` scores)."""
        return F.normalize(normed_hidden.detach().float().cpu(), dim=-1)

    def observe(self, first_entry: int, keys: torch.Tensor, tokens: Sequence[int]) -> None:
        """Entries ``first_entry ..`` of the current sequence were just computed with ``keys``.

        ``tokens`` is the committed sequence (its last token pending, chosen by the target).
        Entry j read ``tokens[j + 1]`` and is labelled ``tokens[j + 2]`` once that exists;
        entries still unlabelled wait for the next call.
        """
        if len(tokens) > self._seq_len:
            self.stream.extend(int(t) for t in tokens[self._seq_len :])
            self._seq_len = len(tokens)
        self._waiting.extend((first_entry + i, keys[i]) for i in range(keys.shape[0]))
        ready = [(j, key) for j, key in self._waiting if j + 2 < len(tokens)]
        self._waiting = [(j, key) for j, key in self._waiting if j + 2 >= len(tokens)]
        if ready:
            self._store(
                torch.stack([key for _, key in ready]),
                torch.tensor([tokens[j + 1] for j, _ in ready], dtype=torch.long),
                torch.tensor([self._seq_start + j + 2 for j, _ in ready], dtype=torch.long),
            )
        self._trim()

    def end_sequence(self) -> None:
        """A request ended: entries without a label are dropped, the stream gets a separator."""
        self._waiting = []
        self._drafted = None
        if self._seq_len:
            self.stream.append(SEP)
            self._seq_start = self.offset + len(self.stream)
            self._seq_len = 0

    def _store(self, keys: torch.Tensor, read: torch.Tensor, pos: torch.Tensor) -> None:
        cap = self.cfg.capacity
        if keys.shape[0] > cap:
            keys, read, pos = keys[-cap:], read[-cap:], pos[-cap:]
        n = keys.shape[0]
        idx = (torch.arange(n) + self.next) % cap
        overwritten = self.read[idx]
        serials = torch.arange(n) + self._serials
        self._serials += n
        with torch.no_grad():
            self.keys[idx] = keys
            self.read[idx] = read
            self.pos[idx] = pos
            self.serial[idx] = serials
        for tok, count in zip(*(t.tolist() for t in torch.unique(overwritten[overwritten >= 0], return_counts=True))):
            b = self._buckets[tok]
            b.live -= count
            if b.live == 0:
                del self._buckets[tok]
            elif b.n > 2 * b.live + 64:
                b.compact(self.serial)
        for tok in torch.unique(read).tolist():
            rows = read == tok
            self._buckets.setdefault(tok, _Bucket(self.hidden_size)).append(keys[rows], idx[rows], serials[rows])
        self.next = int((self.next + n) % cap)
        self.size = min(cap, self.size + n)
        self.added += n

    def _trim(self) -> None:
        """Keep the stream to what stored positions can reach (at most twice the capacity, never the current sequence)."""
        cap = self.cfg.capacity
        if len(self.stream) <= 2 * cap:
            return
        oldest = int(self.pos[: self.size].min()) if self.size else self.offset + len(self.stream)
        cut = min(oldest, self._seq_start, self.offset + len(self.stream) - cap) - self.offset
        if cut > 0:
            del self.stream[:cut]
            self.offset += cut

    # -- drafting ----------------------------------------------------------------------
    def retrieve(self, query: torch.Tensor, read_token: int, depth: int = 0) -> Retrieval | None:
        """The k stored neighbours of one key that read ``read_token`` (None if none did);
        ``depth`` is the tree depth of the node whose state the key is (0: the root)."""
        b = self._buckets.get(read_token)
        if b is None:
            return None
        sims = b.keys[: b.n] @ query
        if b.live < b.n:
            sims = sims.masked_fill(~b.valid(self.serial), float("-inf"))
        k = min(self.cfg.k, b.live)
        top, at = torch.topk(sims, k)
        weights = torch.softmax(top / self.cfg.temperature, dim=0)
        conts = [self._continuation(int(p)) for p in self.pos[b.slots[at]]]
        labels = torch.tensor([c[0] if c else SEP for c in conts], dtype=torch.long)
        keep = labels != SEP  # a label trimmed from the stream
        if not bool(keep.any()):
            return None
        weights = weights[keep] / weights[keep].sum()
        conts = [c for c, ok in zip(conts, keep.tolist()) if ok]
        return Retrieval(labels[keep], weights, build_weighted_trie(conts, weights.tolist(), depth), float(top[0]))

    # -- the votes' share --------------------------------------------------------------
    @staticmethod
    def similarity_bin(similarity: float) -> int:
        return next((i for i, edge in enumerate(SIMILARITY_BINS) if similarity < edge), len(SIMILARITY_BINS) - 1)

    def vote_weight(self, similarity: float) -> float:
        """The votes' share for a nearest neighbour this similar: learned (EM), or the configured one."""
        if not self.cfg.learn_weight:
            return self.cfg.weight
        b = self.similarity_bin(similarity)
        w = (float(self.weight_resp[b]) + WEIGHT_PRIOR_TRIALS * self.cfg.weight) / (float(self.weight_trials[b]) + WEIGHT_PRIOR_TRIALS)
        return min(max(w, 0.01), 0.99)

    def grade(self, token: int, target_to_draft: torch.Tensor) -> None:
        """The target committed ``token`` after the last root: one EM step for that root's bin."""
        drafted, self._drafted = self._drafted, None
        if drafted is None:
            return
        d = int(target_to_draft[token])
        p_head = float(drafted.head_probs[d]) if d >= 0 else 0.0
        p_votes = float(drafted.found.weights[drafted.found.labels == token].sum())
        w = drafted.weight
        total = w * p_votes + (1.0 - w) * p_head
        if total <= 0.0:
            return
        self.weight_resp[drafted.bin] += w * p_votes / total
        self.weight_trials[drafted.bin] += 1.0

    def _continuation(self, position: int) -> list[int]:
        """Up to ``max_len`` stream tokens from ``position`` on, stopping at a separator."""
        i = position - self.offset
        if i < 0:
            return []
        cont = self.stream[i : i + self.cfg.max_len]
        return cont[: cont.index(SEP)] if SEP in cont else cont

    def mix(
        self, logp: torch.Tensor, draft_to_target: torch.Tensor, target_to_draft: torch.Tensor,
        found: Retrieval | None, k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (target ids, log-probs) of ``(1 - w) * head + w * votes`` for one row.

        ``logp`` [draft vocab] is the head's distribution; ``draft_to_target`` maps its
        entries to target ids and ``target_to_draft`` back (-1 outside the draft
        vocabulary: a label there still gets its votes as a candidate). Without
        neighbours the head's distribution is kept unchanged.
        """
        out_t = torch.zeros(k, dtype=torch.long)
        out_l = torch.full((k,), float("-inf"))
        self._drafted = None
        if found is None:
            val, idx = torch.topk(logp.float(), min(k, logp.numel()))
            out_t[: val.numel()], out_l[: val.numel()] = draft_to_target[idx], val
            return out_t, out_l
        w = self.vote_weight(found.similarity)
        head_probs = logp.float().exp()
        self._drafted = _Drafted(head_probs, found, self.similarity_bin(found.similarity), w)
        mixed = head_probs * (1.0 - w)
        d = target_to_draft[found.labels]
        inside = d >= 0
        mixed.index_add_(0, d[inside], found.weights[inside] * w)
        val, idx = torch.topk(mixed, min(k, mixed.numel()))
        cand_t, cand_p = draft_to_target[idx], val
        if not bool(inside.all()):  # labels outside the draft vocabulary compete on their votes
            extra_t, inv = torch.unique(found.labels[~inside], return_inverse=True)
            extra_p = torch.zeros(extra_t.numel()).index_add_(0, inv, found.weights[~inside] * w)
            cand_t, cand_p = torch.cat([cand_t, extra_t]), torch.cat([cand_p, extra_p])
            cand_p, order = torch.sort(cand_p, descending=True)
            cand_t, cand_p = cand_t[order][:k], cand_p[:k]
        n = cand_t.numel()
        out_t[:n], out_l[:n] = cand_t, torch.log(cand_p.clamp(min=1e-30))
        return out_t, out_l

    def children(self, node: TrieNode | None, k: int) -> tuple[list[int], list[float]]:
        """The k best continuations below a retrieval-trie node, scored ``q(depth) * weight share``."""
        return top_children(node, k, 0, self.reliability.table())

    def calibrate(self, trie: TrieNode, committed: Sequence[int]) -> None:
        """Score a retrieval trie's top continuations against the tokens the target committed after it.

        The first level is the votes' (mixed with the head); from the second token on,
        each step along the committed tokens is one trial of q(depth).
        """
        if committed:
            grade_trie(trie.children.get(int(committed[0])), committed[1:], self.reliability)

    # -- persistence (files inside an online state directory) --------------------------
    def write_files(self, directory: Path) -> None:
        n = self.size
        order = (torch.arange(n) + (self.next - n)) % self.cfg.capacity  # oldest first
        save_file(
            {"keys": self.keys[order].contiguous(), "read": self.read[order].contiguous(),
             "pos": (self.pos[order] - self.offset).contiguous(), "stream": torch.tensor(self.stream, dtype=torch.long)},
            str(directory / "knn.safetensors"),
        )
        meta = {"version": KNN_VERSION, "config": asdict(self.cfg), "hidden_size": self.hidden_size,
                "head": self.fingerprint, "added": self.added, "reliability": self.reliability.to_json(),
                "vote_weight": {"responsibility": self.weight_resp.tolist(), "trials": self.weight_trials.tolist()}}
        (directory / "knn.json").write_text(json.dumps(meta, indent=2))

    def read_files(self, directory: Path) -> None:
        meta_path, path = directory / "knn.json", directory / "knn.safetensors"
        if not meta_path.is_file() or not path.is_file():
            raise LtdError(f"online state in {directory} has no kNN memory (made without knn); reset it with: ltd online reset {directory}")
        fix = f"reset it with: ltd online reset {directory}"
        try:
            meta = json.loads(meta_path.read_text())
            t = load_file(str(path))
            keys, read, pos, stream = t["keys"], t["read"], t["pos"], t["stream"]
        except (json.JSONDecodeError, OSError, SafetensorError, KeyError) as exc:
            raise LtdError(f"kNN memory in {directory} is corrupt ({type(exc).__name__}); {fix}") from None
        if meta.get("version") != KNN_VERSION or meta.get("hidden_size") != self.hidden_size:
            raise LtdError(f"kNN memory in {directory} was made by another version or head size; {fix}")
        if meta.get("head") != self.fingerprint:
            raise LtdError(f"kNN memory in {directory} was built with another draft head; {fix}")
        n = keys.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.hidden_size or read.shape != (n,) or pos.shape != (n,) or stream.dim() != 1 \
                or (n and (int(pos.min()) < 0 or int(pos.max()) >= stream.numel())):
            raise LtdError(f"kNN memory in {directory} has inconsistent tensors; {fix}")
        try:
            self.reliability.load_json(meta["reliability"])
            resp = torch.tensor(meta["vote_weight"]["responsibility"], dtype=torch.float64)
            trials = torch.tensor(meta["vote_weight"]["trials"], dtype=torch.float64)
            if resp.shape != self.weight_resp.shape or trials.shape != resp.shape or bool((resp < 0).any()) or bool((resp > trials).any()):
                raise ValueError("vote weight counts")
            self.weight_resp, self.weight_trials = resp, trials
        except (KeyError, TypeError, ValueError):
            raise LtdError(f"kNN memory in {directory} has corrupt learned counts; {fix}") from None
        self.size = self.next = 0
        self.read.fill_(-1)
        self.serial.fill_(-1)
        self._buckets = {}
        self.stream, self.offset = stream.tolist(), 0
        if self.stream and self.stream[-1] != SEP:
            self.stream.append(SEP)
        self._seq_start, self._seq_len, self._waiting = len(self.stream), 0, []
        self._store(keys.float(), read.long(), pos.long())
        self.added = int(meta.get("added", n))
        log.info("kNN memory: restored %d positions from %s", self.size, directory)
