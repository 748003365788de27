"""``ltd profile | record | train-policy | oracle`` end to end on tiny models saved to disk.

The tiny target and drafter are saved with a 96-word tokenizer built on the spot, so the
commands load them exactly as they load real models (``--model DIR``).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import make_tiny_head, make_tiny_llama
from ltd.drafting.eagle3 import save_head
from ltd.errors import LtdError
from ltd.rl.cli import add_parsers
from test_rl_common import hand_latency, noisy_copy

torch.set_num_threads(1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltd")
    add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def run(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    return args.func(args)


def save_with_tokenizer(model, directory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = make_tiny_llama(seed=0)
    return save_with_tokenizer(target, root / "target"), save_with_tokenizer(noisy_copy(target), root / "drafter")


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "alpaca").mkdir()
    lines = [{"question_id": i, "category": "writing", "turns": [" ".join(f"w{(7 * i + j) % 90}" for j in range(5 + i))]}
             for i in range(3)]
    (root / "alpaca" / "question.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


@pytest.mark.slow  # profiles, records, trains and replays: the full suite runs it, make test-fast does not
def test_profile_record_train_oracle(tmp_path, models, questions, capsys):
    target, drafter = models
    lat = tmp_path / "lat.json"
    assert run("profile", "--model", target, "--drafter", drafter, "--out", str(lat), "--topk", "3", "--max-depth", "3",
               "--sizes", "1,2,4,8", "--contexts", "16,64", "--repeats", "1", "--cycles", "2") == 0
    assert json.loads(lat.read_text())["draft_topk"] == 3 and lat.with_suffix(".png").is_file()
    traces = tmp_path / "traces"
    assert run("record", "--model", target, "--drafter", drafter, "--data-dir", str(questions), "--max-depth", "3",
               "--topk", "3", "--max-size", "8", "--max-new-tokens", "20", "--out", str(traces), "--no-progress", "--raw") == 0
    man = json.loads((traces / "manifest.json").read_text())
    assert man["suites"] == ["alpaca"] and man["held_out"] == [] and len(man["sequences"]) == 3
    assert [s["key"] for s in man["sequences"]] == ["alpaca/0", "alpaca/1", "alpaca/2"]
    out = tmp_path / "policies"
    assert run("train-policy", "--env", "replay", "--stage", "both", "--iterations", "1", "--n-steps", "64",
               "--batch-size", "32", "--sizes", "1,2,4,8", "--traces", str(traces), "--latency", str(lat),
               "--out", str(out)) == 0
    assert (out / "depth" / "policy.json").is_file() and (out / "size" / "policy.json").is_file()
    capsys.readouterr()
    report = tmp_path / "oracle.json"
    assert run("oracle", "--traces", str(traces), "--latency", str(lat), "--policies", str(out), "--static", "2x4,3x8,2x3",
               "--rules", "greedy,suffix-rule", "--out", str(report)) == 0
    text = capsys.readouterr().out
    assert "oracle" in text and "ltd" in text and "heuristic" in text and "static:2x3x4" in text
    assert "greedy" in text and "suffix-rule" in text
    # the oracle may choose every size a compared controller can (3 is not in the default set)
    assert {0, 1, 2, 3, 4, 8} <= set(json.loads(report.read_text())["oracle_sizes"])
    rows = {r["name"]: r for r in json.loads(report.read_text())["results"]}
    assert rows["oracle"]["fraction_of_oracle"] == 1.0
    assert all(0 < r["fraction_of_oracle"] <= 1.0 for r in rows.values())
    # --live re-runs ar and every controller with the models that recorded the traces
    capsys.readouterr()
    assert run("oracle", "--traces", str(traces), "--latency", str(lat), "--policies", str(out), "--static", "2x4",
               "--live", "--threads", "1", "--out", str(report)) == 0
    assert "live/replay" in capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads(report.read_text())["results"]}
    for name in ("ar", "ltd", "heuristic", "static:2x3x4"):
        assert rows[name]["live_tokens_per_second"] > 0 and rows[name]["live_over_replay"] > 0
        # greedy: the same decisions accept the same tokens live as in replay
        assert rows[name]["live_tokens_per_cycle"] == rows[name]["tokens_per_cycle"], name
    assert "live_tokens_per_second" not in rows["oracle"]  # hindsight cannot run live
    assert rows["ar"]["live_speedup_vs_ar"] == 1.0


def test_record_with_an_adapting_drafter(tmp_path, models, questions):
    """``record --online VARIANT`` traces the drafter as it learns along the prompts, and says so."""
    target, drafter = models
    common = ["--model", target, "--data-dir", str(questions), "--max-depth", "3", "--topk", "3", "--max-size", "8",
              "--max-new-tokens", "20", "--no-progress", "--raw"]
    head_dir = tmp_path / "head"  # an EAGLE-3 head on the (seeded, identical) tiny target
    save_head(make_tiny_head(make_tiny_llama(seed=0), draft_vocab_size=64, layer_ids=[1, 2, 3]), head_dir)
    assert run("record", *common, "--drafter", str(head_dir), "--online", "knn", "--out", str(tmp_path / "m")) == 0
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert man["online"] == "knn" and len(man["sequences"]) == 3
    assert run("record", *common, "--drafter", "ngram", "--out", str(tmp_path / "f")) == 0
    assert "online" not in json.loads((tmp_path / "f" / "manifest.json").read_text())
    # a variant the drafter cannot adapt is refused in one line (a small LM has no EAGLE-3 head)
    with pytest.raises(LtdError, match="EAGLE-3 head") as info:
        run("record", *common, "--drafter", drafter, "--online", "knn", "--out", str(tmp_path / "k"))
    assert "\n" not in str(info.value)


def test_user_errors_are_one_line(tmp_path, questions):
    def refuse(match, *argv):
        with pytest.raises(LtdError, match=match) as info:
            run(*argv)
        assert "\n" not in str(info.value)

    # held-out suites need an explicit flag (checked before any model loads)
    refuse("held out", "record", "--model", "nowhere", "--suites", "alpaca,gsm8k", "--data-dir", str(questions),
           "--out", str(tmp_path / "t"))
    hand_latency().save(tmp_path / "lat.json")
    refuse("no traces", "oracle", "--traces", str(tmp_path), "--latency", str(tmp_path / "lat.json"))
    # the rule names are checked before any trace is read
    from ltd.rl.cli import _rule_controllers

    with pytest.raises(LtdError, match="unknown --rules oracle-ish; choose from greedy, suffix-rule"):
        _rule_controllers("greedy,oracle-ish", None, None)
    refuse("needs --traces", "train-policy", "--latency", str(tmp_path / "lat.json"), "--out", str(tmp_path / "o"))
    refuse("does not exist", "train-policy", "--traces", str(tmp_path), "--latency", str(tmp_path / "missing.json"),
           "--out", str(tmp_path / "o"))
    refuse("--out must name a .json", "profile", "--out", str(tmp_path / "lat.txt"), "--drafter", "self")


@pytest.mark.slow  # profiles, records and trains twice: the full suite runs it, make test-fast does not
def test_tune_policy_fits_and_resumes(tmp_path, models, questions, capsys):
    """One command profiles, records and trains; a rerun reuses every finished step."""
    target, drafter = models
    out = tmp_path / "tuned"
    argv = ("tune-policy", "--model", target, "--drafter", drafter, "--data-dir", str(questions), "--raw", "--limit", "2",
            "--max-depth", "3", "--topk", "3", "--max-size", "8", "--sizes", "0,1,2,4", "--max-new-tokens", "16",
            "--iterations", "1", "--n-steps", "64", "--contexts", "16,64", "--repeats", "1", "--cycles", "2",
            "--threads", "1", "--no-progress", "--out", str(out))
    assert run(*argv) == 0
    lat = json.loads((out / "latency.json").read_text())
    assert lat["draft_topk"] == 3
    assert len(json.loads((out / "traces" / "manifest.json").read_text())["sequences"]) == 2
    for kind in ("depth", "size"):
        assert (out / "policy" / kind / "policy.json").is_file()
    size_spec = json.loads((out / "policy" / "size" / "policy.json").read_text())
    assert "--policy " + str(out / "policy") in capsys.readouterr().out
    stamp = (out / "latency.json").stat().st_mtime_ns
    assert run(*argv) == 0  # resumes: nothing is redone
    assert "reusing the latency profile" in capsys.readouterr().out
    assert (out / "latency.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "policy" / "size" / "policy.json").read_text()) == size_spec
    # a profile made with another top-k is refused, not silently reused
    with pytest.raises(LtdError, match="top-k 3, not 4"):
        run(*[a if a != "3" or argv[i - 1] != "--topk" else "4" for i, a in enumerate(argv)])
    with pytest.raises(LtdError, match="--max-size is 8"):
        run(*argv[:-1], str(tmp_path / "other"), "--sizes", "0,16")


def test_profile_fills_the_suffix_store_and_prints_the_drafting_cost(tmp_path, models, questions, capsys):
    """``--online memory --store-tokens N``: the store holds N tokens of suite text (within
    its budget) before the cycles, and the summary prints the drafting cost per cycle."""
    target, _ = models
    lat = tmp_path / "lat.json"
    common = ["profile", "--model", target, "--drafter", "suffix", "--out", str(lat), "--topk", "2", "--max-depth", "8",
              "--sizes", "1,4", "--contexts", "16", "--repeats", "1", "--cycles", "3"]
    assert run(*common, "--online", "memory", "--store-tokens", "500", "--data-dir", str(questions)) == 0
    out = capsys.readouterr().out
    stored = int(out.split("suffix store: ")[1].split()[0])
    assert 498 <= stored <= 500  # N tokens, separators included (a request is at least 3)
    cost = out.split("drafting per cycle: ")[1]
    assert float(cost.split()[0]) > 0 and cost.split()[1:5] == ["ms", "(median)", "at", "depth"]
    for match, extra in (("add --online memory", []), ("more than the store holds", ["--online", "memory"])):
        with pytest.raises(LtdError, match=match) as info:
            run(*common, *extra, "--store-tokens", "500" if not extra else "1000000")
        assert "\n" not in str(info.value)
