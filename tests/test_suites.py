"""The shipped benchmark suites and the mixed stream (no model needed)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from ltd.bench.suites import COPY_SUITES, MIXED, PACKAGED_DATA_DIR, SUITES, load_suites, mixed_stream, parse_suite_list, resolve_data_dir
from ltd.errors import LtdError


def test_suites_load_from_the_package_in_any_directory(tmp_path, monkeypatch):
    """A clone or a wheel benchmarks from its own copy: no folder beside the checkout."""
    monkeypatch.chdir(tmp_path)  # nothing relative to the cwd can be found from here
    assert os.listdir(tmp_path) == []
    base = resolve_data_dir(None)
    assert base == PACKAGED_DATA_DIR and base.is_dir()
    import ltd

    assert base.resolve().is_relative_to(os.path.dirname(ltd.__file__))
    questions = load_suites(SUITES)
    by_suite = {s: [q for q in questions if q.suite == s] for s in SUITES}
    for suite, qs in by_suite.items():
        assert len(qs) >= 10, suite
    assert set(COPY_SUITES) == {"edit", "rag", "multiturn"}
    # the copy-heavy suites carry the text to copy inside the prompt
    assert all("def " in q.turns[0] for q in by_suite["edit"])
    assert all(len(q.turns) == 2 and q.all_turns for q in by_suite["multiturn"])
    assert not any(q.all_turns for s in SUITES if s != "multiturn" for q in by_suite[s])


def test_data_dir_override_still_works(tmp_path):
    (tmp_path / "edit").mkdir()
    (tmp_path / "edit" / "question.jsonl").write_text('{"question_id": 1, "category": "edit", "turns": ["x"]}\n')
    qs = load_suites(["edit"], tmp_path)
    assert [q.key for q in qs] == ["edit/1"]
    with pytest.raises(LtdError, match="--data-dir"):
        load_suites(["edit"], tmp_path / "missing")


def test_mixed_stream_holds_every_suite_in_a_fixed_interleaved_order():
    first = mixed_stream(limit=5)
    again = load_suites([MIXED], limit=5)
    assert [q.key for q in first] == [q.key for q in again]  # deterministic
    assert {q.suite for q in first} == set(SUITES)
    assert sorted(q.key for q in first) == sorted(q.key for q in load_suites(SUITES, limit=5))
    assert len({q.key for q in first}) == len(first) == 5 * len(SUITES)
    # interleaved, not suite after suite: the suite changes often along the stream
    changes = sum(a.suite != b.suite for a, b in zip(first, first[1:]))
    assert changes > len(first) // 2
    # the seed fixes the order; another seed gives another order of the same questions
    other = mixed_stream(limit=5, seed=1)
    assert [q.key for q in other] != [q.key for q in first]
    assert sorted(q.key for q in other) == sorted(q.key for q in first)
    multi = [q for q in first if q.suite == "multiturn"]
    assert multi and all(len(q.turns) == 2 and q.all_turns for q in multi)


def test_parse_suite_list_knows_the_new_suites_and_mixed():
    assert parse_suite_list("edit,rag,multiturn") == ["edit", "rag", "multiturn"]
    assert parse_suite_list("mixed") == ["mixed"]
    with pytest.raises(LtdError, match="pass it alone"):
        parse_suite_list("mixed,edit")
    with pytest.raises(LtdError, match="mixed"):
        parse_suite_list("mixd")


def test_bench_runs_both_turns_of_multiturn_without_the_flag():
    """multiturn's second turn revises the first answer, so it is never cut to one turn."""
    from ltd.bench.runner import _Loop

    loop = _Loop.__new__(_Loop)
    loop.config = SimpleNamespace(multi_turn=False)
    questions = {q.suite: q for q in mixed_stream(limit=1)}
    assert loop._turns(questions["multiturn"]) == 2
    assert loop._turns(questions["mt_bench"]) == 1
    loop.config = SimpleNamespace(multi_turn=True)
    assert loop._turns(questions["mt_bench"]) == len(questions["mt_bench"].turns) == 2


def test_bench_cli_accepts_mixed(tmp_path):
    from ltd.bench.cli import _questions

    args = SimpleNamespace(limit=2, grid=False, questions=None, suites="mixed", from_hub=False, data_dir=None, offset=0)
    questions, source = _questions(args)
    assert {q.suite for q in questions} == set(SUITES)
    assert "shared" not in source["data_dir"].split(os.sep)


def test_bench_interleave_streams_the_chosen_suites_like_mixed(tmp_path):
    """--interleave: the named suites' questions in mixed's seeded order, not suite by suite."""
    import argparse

    from ltd.bench.cli import add_parser, config_from_args

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    argv = ["bench", "--suites", "edit,rag,multiturn", "--limit", "10", "--repeats", "1", "--out", str(tmp_path)]
    parse = sub.choices["bench"].parse_args
    grouped = config_from_args(parse(argv[1:])).questions
    mixed = config_from_args(parse(argv[1:] + ["--interleave"]))
    assert sorted(q.key for q in mixed.questions) == sorted(q.key for q in grouped)
    assert [q.suite for q in grouped] == ["edit"] * 10 + ["rag"] * 10 + ["multiturn"] * 10
    suites = [q.suite for q in mixed.questions]
    assert set(suites[:15]) == set(suites[15:]) == {"edit", "rag", "multiturn"}  # both halves hold every kind
    assert mixed.source["interleaved"] is True
    assert [q.key for q in config_from_args(parse(argv[1:] + ["--interleave"])).questions] == [q.key for q in mixed.questions]


def test_offset_gives_the_training_split_disjoint_from_the_first_questions():
    """Policies train from TRAIN_OFFSET on and are judged on the first questions: never the same prompt."""
    from ltd.bench.suites import TRAIN_OFFSET

    judged = mixed_stream(limit=TRAIN_OFFSET)
    train = mixed_stream(limit=4, offset=TRAIN_OFFSET)
    assert {q.suite for q in train} == set(SUITES)
    assert all(sum(q.suite == s for q in train) == 4 for s in SUITES)
    assert not {q.key for q in judged} & {q.key for q in train}
    first = load_suites(["edit"], limit=TRAIN_OFFSET + 1)
    assert load_suites(["edit"], limit=1, offset=TRAIN_OFFSET)[0].key == first[-1].key
    with pytest.raises(LtdError, match="lower --offset"):
        load_suites(["rag"], offset=1000)
    with pytest.raises(LtdError, match="--offset must be at least 0"):
        load_suites(["rag"], offset=-1)


def test_record_takes_every_suite_from_the_training_split_without_allow_held_out():
    from ltd.rl.cli import _questions

    args = SimpleNamespace(limit=1, questions=None, suites="mixed", allow_held_out=False, data_dir=None, offset=0)
    with pytest.raises(LtdError, match="--offset 10"):
        _questions(args)
    args.offset = 10
    questions, source = _questions(args)
    assert {q.suite for q in questions} == set(SUITES) and source["held_out"] == [] and source["offset"] == 10


def test_bench_offset_is_refused_where_it_cannot_apply(tmp_path):
    from ltd.bench.cli import _questions

    args = SimpleNamespace(limit=2, grid=False, questions=None, suites="edit", from_hub=True, data_dir=None, offset=10)
    with pytest.raises(LtdError, match="drop it with --from-hub"):
        _questions(args)
    args.from_hub = False
    questions, source = _questions(args)
    assert source["offset"] == 10 and [q.key for q in questions] == [q.key for q in load_suites(["edit"], limit=2, offset=10)]
