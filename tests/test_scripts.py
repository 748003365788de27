"""Analysis scripts whose numbers the README cites: their core logic on hand-made inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ltd.drafting.ngram import SEP

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_bound_follows_any_remembered_path():
    bound = load_script("memory_bound")
    memory = np.array([SEP, 1, 6, 7, 8, 9, SEP, 2, 6, 7, 4, 4, 4], dtype=np.int64)
    context = np.array([3, 3, 6, 7], dtype=np.int64)
    # the target continues along the first remembered sequence, then leaves it
    assert bound.remembered(memory, context, np.array([8, 9, 5]), size=3, max_n=4) == 2
    # or along the second one (not the top-ranked path: both occur once), capped at size
    assert bound.remembered(memory, context, np.array([4, 4, 4, 4]), size=3, max_n=4) == 3
    assert bound.remembered(memory, context, np.array([5, 8]), size=3, max_n=4) == 0
    # nothing remembered yet, or a suffix found only in the current context: nothing to add
    assert bound.remembered(np.zeros(0, dtype=np.int64), context, np.array([8]), size=3, max_n=4) == 0
    assert bound.remembered(np.array([SEP, 11, 12], dtype=np.int64), np.array([6, 7, 8, 6, 7]), np.array([8]), 3, 4) == 0
