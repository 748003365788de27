"""Prompts of benchmark questions for recording traces and training live, turn by turn.

A question whose later turns are the point (the ``multiturn`` suite, alone or inside the
``mixed`` stream) runs every turn, as ``ltd bench`` runs it: turn t's prompt is the
conversation so far with the target's own greedy replies, so the policies see the
revision turns, where a model-free drafter copies most. Such a prompt is known only once
the earlier turns are decoded, so it is a :class:`FollowUp` until then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence, Union

from ltd.bench.runner import encode_turns
from ltd.bench.suites import Question
from ltd.engine import GenerateConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FollowUp:
    """A later turn: its prompt ids from the greedy outputs of the turns before it."""

    previous: tuple[str, ...]  # keys of the earlier turns, in order
    build: Callable[[Sequence[Sequence[int]]], list[int]]


Prompt = Union[Sequence[int], FollowUp]


def question_prompts(engine, questions: Sequence[Question], chat: bool = True) -> tuple[list[str], list[Prompt]]:
    """(keys, prompts) of every turn to run, in order: the first turn of each question,
    and the later ones of questions that are judged whole (``Question.all_turns``).

    Without the chat template (``chat=False``) a conversation cannot be written, so only
    first turns run then."""
    keys: list[str] = []
    prompts: list[Prompt] = []
    skipped = 0
    for q in questions:
        turns = len(q.turns) if q.all_turns else 1
        if not chat and turns > 1:
            skipped += turns - 1
            turns = 1
        keys.append(q.turn_key(0))
        prompts.append(engine.encode(q.turns[0], chat=chat))
        for t in range(1, turns):
            prompts.append(FollowUp(tuple(keys[-t:]), partial(_turn_prompt, engine, q.turns[: t + 1])))
            keys.append(q.turn_key(t))
    if skipped:
        log.warning("without the chat template only first turns run: %d later turns left out", skipped)
    return keys, prompts


def _turn_prompt(engine, turns: Sequence[str], outputs: Sequence[Sequence[int]]) -> list[int]:
    replies = [engine.target.tokenizer.decode(list(o), skip_special_tokens=True) for o in outputs]
    return encode_turns(engine, turns, replies)


def prompt_of(item: Prompt, outputs: dict[str, Sequence[int]]) -> list[int]:
    """The token ids of ``item``, given the greedy outputs of the turns before it."""
    if isinstance(item, FollowUp):
        return item.build([outputs[k] for k in item.previous])
    return list(item)


def resolve_prompts(engine, keys: Sequence[str], prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
    """Every prompt as token ids, decoding (method ``ar``) the turns a later turn follows."""
    needed = {k for item in prompts if isinstance(item, FollowUp) for k in item.previous}
    outputs: dict[str, Sequence[int]] = {}
    resolved = []
    for key, item in zip(keys, prompts):
        prompt = prompt_of(item, outputs)
        resolved.append(prompt)
        if key in needed:
            outputs[key] = engine.generate(prompt, GenerateConfig(method="ar", max_new_tokens=max_new_tokens)).tokens
    return resolved
