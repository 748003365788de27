"""Tools outside the package: the reusable script in scripts/, the experiments whose numbers
docs/results.md cites (their core logic on hand-made inputs), and ``ltd drafter shrink-vocab``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ltd.cli import main
from ltd.drafting.eagle3 import load_head, save_head
from ltd.drafting.ngram import SEP
from ltd.fileio import atomic_write_json

from conftest import make_tiny_head, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_bound_follows_any_remembered_path():
    bound = load_module(ROOT / "experiments" / "memory_bound.py")
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


def test_stream_halves_reports_each_suites_second_half(tmp_path, capsys):
    halves = load_module(ROOT / "scripts" / "stream_halves.py")
    runs = [
        # humaneval, 4 prompts in stream order: the second half is the last two
        *({"suite": "humaneval", "method": "static:3x8x3", "new_tokens": 10, "cycles": c, "seconds": s}
          for c, s in ((10, 1.0), (10, 1.0), (5, 2.0), (4, 2.0))),
        {"suite": "gsm8k", "method": "static:3x8x3", "new_tokens": 12, "cycles": 6, "seconds": 3.0},
        {"suite": "gsm8k", "method": "static:3x8x3", "new_tokens": 8, "cycles": 2, "seconds": 1.0},
    ]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": runs}))
    assert halves.main([str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "humaneval" and lines[2] == "gsm8k"
    assert "prompts   4" in lines[1] and "accepted 2.222" in lines[1] and "tokens/s 5.00" in lines[1]
    assert "prompts   2" in lines[3] and "accepted 4.000" in lines[3] and "tokens/s 8.00" in lines[3]


def _feature_cache(directory: Path, top_ids: torch.Tensor, input_ids: torch.Tensor) -> None:
    """A feature cache holding only the token columns that vocabulary counts read."""
    directory.mkdir()
    save_file({"top_ids": top_ids, "input_ids": input_ids}, str(directory / "shard-0.safetensors"))
    atomic_write_json(directory / "manifest.json", {
        "target": "tiny", "data": "test", "layer_ids": [1, 2, 3], "max_len": 64, "label_topk": 2,
        "hidden_size": 48, "vocab_size": 96, "shards": ["shard-0.safetensors"],
    })


def test_cli_shrink_vocab_keeps_the_most_frequent_draft_tokens(tmp_path, capsys):
    head = make_tiny_head(make_tiny_llama(seed=0), draft_vocab_size=24, layer_ids=[1, 2, 3], seed=3)
    save_head(head, tmp_path / "head", dtype=torch.float32)
    own = head.draft_to_target(torch.arange(24))
    frequent = own[[5, 0, 17, 9]]  # counted 4, 3, 2 and 1 times among the labels and inputs
    outside = [t for t in range(96) if t not in own.tolist()][0]  # frequent, but not a draft token
    labels = torch.cat([frequent[[0, 0, 1, 2]], torch.full((5,), outside)])
    top_ids = torch.stack([labels, torch.zeros_like(labels)], dim=1)  # top-1 label first
    inputs = frequent[[0, 0, 1, 1, 2, 3]]
    _feature_cache(tmp_path / "features", top_ids, inputs)

    argv = ["drafter", "shrink-vocab", "--head", str(tmp_path / "head"), "--features", str(tmp_path / "features")]
    assert main([*argv, "--size", "4", "--out", str(tmp_path / "small")]) == 0
    assert "draft vocabulary -> 4 tokens" in capsys.readouterr().out
    small = load_head(tmp_path / "small")
    assert small.draft_to_target(torch.arange(4)).tolist() == sorted(frequent.tolist())
    rows = torch.tensor(sorted([5, 0, 17, 9]))
    # the kept rows' trained weights, written in the shipped half precision
    assert torch.equal(small.lm_head.weight, head.lm_head.weight[rows].half().float())

    assert main([*argv, "--size", "25", "--out", str(tmp_path / "bad")]) == 2
    assert "--size must be in 1..24" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "nowhere"), "--size", "4", "--out", str(tmp_path / "bad")]) == 2
    assert "no feature cache" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("layout", ["2d", "1d"])
def test_token_counts_read_top1_labels_and_inputs(layout):
    from ltd.train.vocab import token_counts

    top = torch.tensor([[3, 1], [3, 2], [4, 1]]) if layout == "2d" else torch.tensor([3, 3, 4])
    counts = token_counts([{"top_ids": top, "input_ids": torch.tensor([4, 5])}], vocab_size=6)
    assert counts.tolist() == [0, 0, 0, 2, 2, 1]
