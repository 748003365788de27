"""``ltd demo``: a prose prompt and a copy-heavy one, every method equal to plain decoding."""

from __future__ import annotations

import pytest

from ltd.cli import _copy_drafter_spec, main


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("hybrid:ngram+builtin:smollm2-135m-eagle3@1", "hybrid:suffix+builtin:smollm2-135m-eagle3@1"),
        ("hybrid:suffix:16+self", "hybrid:suffix+self"),
        ("ngram", "suffix"),
        ("suffix:48", "suffix"),
        ("self", "hybrid:suffix+self"),
    ],
)
def test_the_copy_drafter_is_the_suffix_drafter_with_the_default_model_half(spec, expected):
    assert _copy_drafter_spec(spec) == expected


@pytest.mark.e2e
def test_demo_runs_every_method_on_prose_and_on_an_edit_prompt(capsys):
    code = main(["demo", "--threads", "1", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "prose: Explain in a few sentences why the sky is blue." in out
    assert "copy (edit/" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[0].partition(":")[0] in ("hf", "ar", "static", "ltd")]
    # hf, ar, static, ltd and the suffix row, on each of the two prompts
    assert len(rows) == 10
    assert sum(1 for r in rows if r[-1] == "same") == 8 and sum(1 for r in rows if r[-1] == "reference") == 2
    assert "identical to plain greedy output (hf): yes" in out
