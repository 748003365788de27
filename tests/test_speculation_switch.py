"""``ltd generate --speculation auto|off``: off decodes plainly, with the same output."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from ltd import cli
from test_rl_cli import save_with_tokenizer

from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_with_tokenizer(make_tiny_llama(seed=0), tmp_path_factory.mktemp("models") / "target")


def _generate(target_dir, *extra: str) -> dict:
    # the target drafts for itself (self): every draft is accepted, so speculation shows
    argv = ["generate", "--model", target_dir, "--drafter", "self", "--method", "static", "--depth", "4", "--topk", "1",
            "--size", "4", "--raw", "--prompt", " ".join(f"w{i % 9}" for i in range(40)), "--max-new-tokens", "24",
            "--threads", "1", "--json", *extra]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return json.loads(out.getvalue())


def test_speculation_off_decodes_plainly_with_the_same_output(target_dir):
    auto = _generate(target_dir)
    off = _generate(target_dir, "--speculation", "off")
    assert auto["method"] == "static" and off["method"] == "ar"
    assert off["tokens"] == auto["tokens"] and off["text"] == auto["text"]
    assert off["mean_accepted"] == 1.0  # one token per cycle: nothing was drafted
    assert auto["mean_accepted"] > 2.0  # auto speculated


def test_speculation_rejects_other_values(target_dir, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", target_dir, "--prompt", "w1", "--speculation", "maybe"])
    assert "--speculation" in capsys.readouterr().err
