"""A reliability table of continuation tries, learned from what the target confirmed.

:data:`ltd.drafting.ngram.DEFAULT_RELIABILITY` says how often a continuation is right
after an m-token match, measured once on the target's answers to ShareGPT prompts. The
kNN memory's retrieved continuations (:mod:`ltd.online.knn`) are scored the same way,
and every cycle tells for free which top continuations the target took (the committed
tokens are the target's choices), so the table is re-estimated while serving: q(m) = (hits + s * prior) / (shares + s), where a trial's share is the count
share the drafter gave its top child (its probability is ``q * share``) and ``s``
pseudo-trials keep the prior until the evidence outweighs it.

It changes which drafts are verified, never the output.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ltd.drafting.ngram import table_index
from ltd.errors import LtdError

DEFAULT_STRENGTH = 50.0  # pseudo-trials of the prior per match length
MIN_RELIABILITY = 0.01


class OnlineReliability:
    """Per effective match length: hits and summed count shares of the drafter's top children."""

    def __init__(self, prior: Sequence[float], strength: float = DEFAULT_STRENGTH) -> None:
        if not prior or strength <= 0:
            raise LtdError(f"online reliability needs a prior table and strength > 0, got {list(prior)} and {strength}")
        self.prior = np.asarray(prior, dtype=np.float64)
        self.strength = float(strength)
        self.hits = np.zeros_like(self.prior)
        self.shares = np.zeros_like(self.prior)
        self._table: tuple[float, ...] | None = None

    def observe(self, match_length: int, share: float, hit: bool) -> None:
        """One top child after a ``match_length``-token match, given ``share`` of its node's count."""
        i = table_index(match_length, self.prior.size)
        self.shares[i] += share
        self.hits[i] += float(hit)
        self._table = None

    def table(self) -> tuple[float, ...]:
        """The current q(m) for m = 1, 2, ... (the drafter's ``reliabilities``)."""
        if self._table is None:
            q = (self.hits + self.strength * self.prior) / (self.shares + self.strength)
            self._table = tuple(float(x) for x in np.clip(q, MIN_RELIABILITY, 1.0))
        return self._table

    @property
    def trials(self) -> float:
        return float(self.shares.sum())

    # -- persistence (reliability.json in the online state directory) -------------------
    def to_json(self) -> dict:
        return {"hits": self.hits.tolist(), "shares": self.shares.tolist(), "strength": self.strength}

    def load_json(self, data: dict) -> None:
        """Restore counts saved by :meth:`to_json`; a table of another length is refused."""
        hits, shares = np.asarray(data["hits"], dtype=np.float64), np.asarray(data["shares"], dtype=np.float64)
        if hits.shape != self.prior.shape or shares.shape != self.prior.shape or (hits < 0).any() or (shares < 0).any():
            raise ValueError("reliability counts do not match the drafter's table")
        self.hits, self.shares, self._table = hits, shares, None
