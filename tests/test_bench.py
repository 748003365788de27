"""Benchmark harness: method parser, suite loader errors, metric arithmetic, one e2e run."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pytest

from ltd.bench import metrics
from ltd.bench.methods import MethodSpec, grid_methods, parse_method, parse_methods
from ltd.cliargs import parse_int_list
from ltd.bench.suites import load_questions, load_suites, parse_suite_list
from ltd.errors import LtdError

# -- method parser -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hf", MethodSpec("hf")),
        ("ar", MethodSpec("ar")),
        ("static:5x8x32", MethodSpec("static", 5, 8, 32)),
        (" static:2x2x4 ", MethodSpec("static", 2, 2, 4)),
        ("static", MethodSpec("static", 5, 8, 32)),
        ("hf-assisted", MethodSpec("hf-assisted")),
        ("prompt-lookup", MethodSpec("prompt-lookup")),
        ("ltd", MethodSpec("ltd")),
        ("ltd:runs/policy", MethodSpec("ltd", policy="runs/policy")),
    ],
)
def test_parse_method(text, expected):
    assert parse_method(text) == expected


def test_method_labels_round_trip():
    for text in ("hf", "ar", "static:3x4x8", "prompt-lookup", "hf-assisted", "ltd:p"):
        assert parse_method(text).label == text
        assert parse_method(parse_method(text).label) == parse_method(text)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("eagle", "unknown method 'eagle'"),
        ("static:5x8", "static:DxKxV"),
        ("static:axbxc", "static:DxKxV"),
        ("static:0x8x32", "depth must be >= 1"),
        ("static:5x0x32", "--topk"),
        ("static:5x8x0", "--size 0"),
        ("ar:3", "takes no ':' argument"),
        ("foo:bar", "unknown method"),
        ("oracle", "unknown method 'oracle'"),  # the placeholder is gone (ltd oracle replays traces)
        ("heuristic", "unknown method 'heuristic'"),  # the engine's, but not timed by the bench
    ],
)
def test_parse_method_errors(text, fragment):
    with pytest.raises(LtdError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        parse_method(text)


def test_parse_methods_adds_baseline_first_and_keeps_order():
    specs = parse_methods("static:5x8x32,ar,static:3x4x8")
    assert [s.label for s in specs] == ["hf", "static:5x8x32", "ar", "static:3x4x8"]
    specs = parse_methods("ar,hf,prompt-lookup")
    assert [s.label for s in specs] == ["hf", "ar", "prompt-lookup"]


def test_parse_methods_rejects_duplicates_and_empty():
    with pytest.raises(LtdError, match="more than once"):
        parse_methods("hf,static:5x8x32,static:5x8x32")
    with pytest.raises(LtdError, match="empty"):
        parse_methods(" , ")


def test_grid_methods_and_int_lists():
    grid = grid_methods([2, 3], [4, 8], topk=8)
    assert [g.label for g in grid] == ["static:2x8x4", "static:2x8x8", "static:3x8x4", "static:3x8x8"]
    assert parse_int_list("2, 3,4", "--grid-depths") == [2, 3, 4]
    with pytest.raises(LtdError, match="--grid-sizes"):
        parse_int_list("4,x", "--grid-sizes")


# -- suite loader --------------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"question_id": 1, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]})


def test_load_questions_ok(tmp_path):
    f = _write(tmp_path / "q.jsonl", [GOOD, "", json.dumps({"question_id": "b", "category": "code", "turns": ["Write code."]})])
    qs = load_questions(f)
    assert [q.question_id for q in qs] == [1, "b"]
    assert qs[0].turns == ("What is 2+2?", "And 3+3?")
    assert [q.suite for q in qs] == ["math", "code"]  # --questions: category is the group
    assert [q.suite for q in load_questions(f, suite="mine")] == ["mine", "mine"]


def test_load_questions_limit_is_per_group(tmp_path):
    lines = [json.dumps({"question_id": i, "category": "ab"[i % 2], "turns": [f"q{i}"]}) for i in range(6)]
    qs = load_questions(_write(tmp_path / "q.jsonl", lines), limit=2)
    assert [q.question_id for q in qs] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"question_id": 2, "turns": ["x"]}), "missing field(s) category"),
        (json.dumps({"question_id": 2, "category": "c"}), "missing field(s) turns"),
        (json.dumps({"question_id": 2, "category": "c", "turns": []}), "turns must be a non-empty list"),
        (json.dumps({"question_id": 2, "category": "c", "turns": "hello"}), "turns must be a non-empty list"),
        (json.dumps({"question_id": 2, "category": "c", "turns": ["ok", 3]}), "turns[1] must be a non-empty string"),
        (json.dumps({"question_id": 2, "category": "c", "turns": ["  "]}), "turns[0] must be a non-empty string"),
        (json.dumps({"question_id": None, "category": "c", "turns": ["x"]}), "question_id must be"),
        (json.dumps({"question_id": 2, "category": 5, "turns": ["x"]}), "category must be a string"),
        (json.dumps({"question_id": 1, "category": "c", "turns": ["x"]}), "already used on line 1"),
    ],
)
def test_load_questions_errors_name_file_and_line(tmp_path, bad, fragment):
    f = _write(tmp_path / "bad.jsonl", [GOOD, "", bad])  # the bad line is line 3
    with pytest.raises(LtdError) as exc:
        load_questions(f)
    msg = str(exc.value)
    assert f"{f}:3:" in msg
    assert fragment in msg
    assert "\n" not in msg


def test_load_questions_missing_and_empty_file(tmp_path):
    with pytest.raises(LtdError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(LtdError, match="holds no questions"):
        load_questions(_write(tmp_path / "empty.jsonl", [""]))


def test_load_suites_from_data_dir(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    _write(tmp_path / "gsm8k" / "question.jsonl", [GOOD])
    qs = load_suites(["gsm8k"], tmp_path)
    assert qs[0].suite == "gsm8k" and qs[0].key == "gsm8k/1"
    with pytest.raises(LtdError, match="suite 'qa' has no"):
        load_suites(["qa"], tmp_path)
    with pytest.raises(LtdError, match="--data-dir"):
        load_suites(["gsm8k"], tmp_path / "missing")


def test_parse_suite_list():
    assert parse_suite_list("gsm8k, humaneval") == ["gsm8k", "humaneval"]
    with pytest.raises(LtdError, match="unknown suite 'gsm9k'"):
        parse_suite_list("gsm9k")
    with pytest.raises(LtdError, match="twice"):
        parse_suite_list("qa,qa")


# -- metric arithmetic on synthetic timings -----------------------------------------------


def _runs(method, table, suite="s", cycles=None, acc=None):
    """table: {prompt: [(tokens, seconds) per repeat]}."""
    return [
        metrics.Run(method, p, suite, r, t, s, cycles if cycles is not None else t, acc)
        for p, reps in table.items()
        for r, (t, s) in enumerate(reps)
    ]


def test_pairwise_speedup_is_per_repeat_then_median():
    base = _runs("hf", {"p1": [(10, 1.0), (10, 2.0), (10, 1.0)], "p2": [(20, 4.0), (20, 4.0), (20, 4.0)]})
    meth = _runs("m", {"p1": [(10, 0.5), (10, 1.0), (10, 0.25)], "p2": [(20, 2.0), (20, 8.0), (20, 1.0)]})
    sp = metrics.pairwise_speedups(meth, base)
    # p1 ratios: 2, 2, 4 -> median 2 (the slow repeat 1 hit both methods and cancels)
    # p2 ratios: 2, 0.5, 4 -> median 2
    assert sp == {"p1": pytest.approx(2.0), "p2": pytest.approx(2.0)}


def test_pairwise_speedup_uses_tokens_per_second_not_seconds():
    base = _runs("hf", {"p": [(10, 1.0)]})
    meth = _runs("m", {"p": [(5, 0.25)]})  # fewer tokens (e.g. an early EOS): 20 tok/s vs 10
    assert metrics.pairwise_speedups(meth, base) == {"p": pytest.approx(2.0)}


def test_pairwise_speedup_skips_missing_pairs():
    base = _runs("hf", {"p1": [(10, 1.0)]})
    meth = _runs("m", {"p1": [(10, 0.5), (10, 0.1)], "p2": [(10, 1.0)]})
    assert metrics.pairwise_speedups(meth, base) == {"p1": pytest.approx(2.0)}


def test_summarize_numbers():
    base = _runs("hf", {"p1": [(10, 1.0), (10, 1.0), (10, 1.0)], "p2": [(10, 1.0), (10, 2.0), (10, 1.0)]})
    meth = _runs("m", {"p1": [(10, 0.5), (10, 0.5), (10, 0.5)], "p2": [(10, 0.25), (10, 0.5), (10, 0.25)]},
                 cycles=4, acc=2.5)
    s = metrics.summarize(meth, base, {"p1": True, "p2": False})
    # per-repeat aggregate tok/s of m: 20/0.75, 20/1.0, 20/0.75
    assert s["tokens_per_second"] == pytest.approx(20 / 0.75)
    assert s["tokens_per_second_min"] == pytest.approx(20.0)
    assert s["tokens_per_second_max"] == pytest.approx(20 / 0.75)
    # per-prompt speedups: p1 = 2, p2 = median(4, 4, 4) = 4
    assert s["speedup"] == pytest.approx(statistics.median([2.0, 4.0]))
    assert s["speedup_min"] == pytest.approx(2.0)
    assert s["speedup_max"] == pytest.approx(4.0)
    assert s["speedup_aggregate"] == pytest.approx((20 / 0.75) / 10.0)
    assert s["mean_accepted"] == pytest.approx(2.5)
    assert s["new_tokens"] == 20
    assert s["prompts"] == 2 and s["repeats"] == 3
    assert s["outputs_match"] == pytest.approx(0.5)
    # the baseline against itself is exactly 1
    assert metrics.summarize(base, base)["speedup"] == pytest.approx(1.0)


def test_weighted_mean_accepted_and_match_fraction():
    runs = [metrics.Run("m", "a", "s", 0, 9, 1.0, 2, 4.0), metrics.Run("m", "b", "s", 0, 7, 1.0, 6, 1.0),
            metrics.Run("m", "c", "s", 0, 7, 1.0, 0, None), metrics.Run("m", "d", "s", 0, 7, 1.0, 3, float("nan"))]
    assert metrics.weighted_mean_accepted(runs) == pytest.approx((4.0 * 2 + 1.0 * 6) / 8)
    assert metrics.weighted_mean_accepted(runs[2:]) is None
    assert metrics.match_fraction([True, True, False, True]) == pytest.approx(0.75)
    assert metrics.match_fraction([]) is None


def test_summarize_all_per_suite_and_best():
    base = _runs("hf", {"a1": [(10, 1.0)]}, suite="A") + _runs("hf", {"b1": [(10, 1.0)]}, suite="B")
    s1 = _runs("static:2x8x4", {"a1": [(10, 0.5)]}, suite="A") + _runs("static:2x8x4", {"b1": [(10, 2.0)]}, suite="B")
    s2 = _runs("static:3x8x8", {"a1": [(10, 0.8)]}, suite="A") + _runs("static:3x8x8", {"b1": [(10, 0.8)]}, suite="B")
    overall, per_suite = metrics.summarize_all(base + s1 + s2, ["hf", "static:2x8x4", "static:3x8x8"], "hf")
    assert per_suite["A"]["static:2x8x4"]["speedup"] == pytest.approx(2.0)
    assert per_suite["B"]["static:2x8x4"]["speedup"] == pytest.approx(0.5)
    assert overall["static:2x8x4"]["speedup"] == pytest.approx(1.25)
    assert overall["static:3x8x8"]["speedup"] == pytest.approx(1.25)
    assert overall["hf"]["speedup"] == pytest.approx(1.0)
    # ties go to the earlier candidate; a clear winner wins
    assert metrics.best_method(overall, ["static:2x8x4", "static:3x8x8"]) == "static:2x8x4"
    assert metrics.best_method({"x": {"speedup": 1.0}, "y": {"speedup": 1.5}}, ["x", "y"]) == "y"
    assert metrics.best_method({}, ["x"]) is None


def test_throughput_zero_seconds():
    assert metrics.throughput(5, 0.0) == 0.0
    assert metrics.spread([]) is None


# -- CLI flags (no model) -----------------------------------------------------------------


def _args(argv):
    from ltd.bench.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_cli_builds_config_without_loading_models(tmp_path):
    from ltd.bench.cli import config_from_args

    f = _write(tmp_path / "q.jsonl", [GOOD])
    cfg = config_from_args(_args(["--questions", str(f), "--methods", "ar,static:2x2x4", "--out", str(tmp_path / "o")]))
    assert [m.label for m in cfg.methods] == ["hf", "ar", "static:2x2x4"]
    assert len(cfg.questions) == 1
    assert cfg.head_dtype == "auto" and cfg.to_json()["head_dtype"] == "auto"
    cfg = config_from_args(_args(["--questions", str(f), "--head-dtype", "float32", "--out", str(tmp_path / "o")]))
    assert cfg.to_json()["head_dtype"] == "float32"
    with pytest.raises(LtdError, match="unknown method 'oracle'"):
        config_from_args(_args(["--questions", str(f), "--methods", "oracle", "--out", str(tmp_path / "o")]))


def test_cli_grid_config(tmp_path):
    from ltd.bench.cli import config_from_args

    f = _write(tmp_path / "q.jsonl", [GOOD])
    cfg = config_from_args(_args(["--grid", "--grid-suite", str(f), "--grid-depths", "2,3", "--grid-sizes", "4,8",
                                  "--topk", "4", "--out", str(tmp_path / "o")]))
    assert [m.label for m in cfg.methods] == ["hf", "static:2x4x4", "static:2x4x8", "static:3x4x4", "static:3x4x8"]
    assert cfg.grid is not None and cfg.grid.topk == 4
    with pytest.raises(LtdError, match="--grid runs on --grid-suite"):
        config_from_args(_args(["--grid", "--questions", str(f), "--out", str(tmp_path / "o")]))


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_bench_end_to_end(tmp_path):
    import torch

    from ltd.bench.runner import BenchConfig, run_bench

    torch.set_num_threads(1)
    f = _write(tmp_path / "q.jsonl", [
        json.dumps({"question_id": 1, "category": "code", "turns": ["Write a Python function that adds two numbers."]}),
        json.dumps({"question_id": 2, "category": "math", "turns": ["What is 12 times 7? Explain briefly."]}),
    ])
    config = BenchConfig(
        model="smollm2-135m",
        drafter="self",
        methods=parse_methods("hf,ar,static:2x2x4"),
        questions=load_questions(f),
        repeats=1,
        max_new_tokens=8,
        progress=False,
    )
    out = tmp_path / "out"
    results = run_bench(config, out_dir=out)
    assert (out / "results.json").is_file()
    assert (out / "report.md").is_file()
    data = json.loads((out / "results.json").read_text())
    assert data["methods"]["ar"]["outputs_match"] == 1.0
    assert data["methods"]["static:2x2x4"]["outputs_match"] == 1.0
    assert data["methods"]["hf"]["speedup"] == pytest.approx(1.0)
    assert set(data["suites"]) == {"code", "math"}
    assert data["best_static"]["method"] == "static:2x2x4"
    assert data["machine"]["cpu_model"]
    assert results["interrupted"] is False


def test_online_suffix_parses_and_labels():
    from ltd.bench.methods import parse_method

    spec = parse_method("static:6x8x32+online=knn")
    assert spec.online == "knn" and spec.depth == 6 and spec.label == "static:6x8x32+online=knn"
    with pytest.raises(LtdError, match="online"):
        parse_method("static:6x8x32+online=nope")
    assert parse_method("static:32x1x32+online=memory").online == "memory"  # the suffix store
    for removed in ("plain", "hedge", "optimistic"):  # variants that lost their benchmarks
        with pytest.raises(LtdError, match="VARIANT one of knn"):
            parse_method(f"ltd+online={removed}")
    assert parse_method("greedy+online=memory").label == "greedy+online=memory"
    with pytest.raises(LtdError, match="methods of ours that draft"):
        parse_method("hf+online=knn")
    with pytest.raises(LtdError, match="methods of ours that draft"):
        parse_method("ar+online=memory")


def test_private_online_copy_of_a_suffix_drafter_has_its_own_store():
    from ltd.bench.methods import private_online_adapter
    from ltd.drafting.suffix import SuffixConfig, SuffixDrafter

    shared = SuffixDrafter(SuffixConfig(max_depth=12))
    adapter = private_online_adapter(shared, "memory")
    private = adapter.drafter
    assert private is not shared and private.config.max_depth == 12
    assert private.store is not None and shared.store is None  # the frozen method stays storeless


def test_online_methods_refuse_repeats(tmp_path):
    """A repeat would replay a prompt an adapting method has already learned."""
    from ltd.bench.runner import BenchConfig

    f = _write(tmp_path / "q.jsonl", [json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]})])
    config = BenchConfig(model="smollm2-135m", methods=parse_methods("hf,static:2x8x3+online=knn"), questions=load_questions(f), repeats=2)
    with pytest.raises(LtdError, match="--repeats 1"):
        config.validate()
    config.repeats = 1
    config.validate()


def test_second_half_metrics_follow_stream_order():
    from ltd.bench.metrics import Run, summarize

    runs = [
        Run("m", f"p{i}", "s", 0, new_tokens=10, seconds=1.0, cycles=10 if i < 2 else 5, mean_accepted=1.0 if i < 2 else 2.0)
        for i in range(4)
    ]
    out = summarize(runs, runs)
    assert out["mean_accepted_second_half"] == pytest.approx(2.0)
    assert out["tokens_per_second_second_half"] == pytest.approx(10.0)



def test_report_sets_each_online_method_beside_the_same_method_without_it():
    """Like with like: the stream's second half of static+online=memory against static alone."""
    from ltd.bench.report import render_markdown

    methods = {
        "hf": {"tokens_per_second_second_half": 10.0},
        "static:8x1x8": {"tokens_per_second_second_half": 20.0, "mean_accepted_second_half": 3.0},
        "static:8x1x8+online=memory": {"tokens_per_second_second_half": 30.0, "mean_accepted_second_half": 5.0},
        "ltd+online=knn": {"tokens_per_second_second_half": 12.0},  # no frozen ltd ran: no row
    }
    text = render_markdown({"methods": methods, "baseline": "hf"})
    assert "## Online adaptation over the stream's second half" in text
    assert "| static:8x1x8+online=memory | static:8x1x8 | 30.0 | 20.0 | 1.50x | 5.00 | 3.00 |" in text
    section = text.split("## Online adaptation over the stream's second half")[1].split("## Definitions")[0]
    assert "| ltd+online=knn |" not in section
    assert "second half" not in render_markdown({"methods": {"static:8x1x8": methods["static:8x1x8"]}, "baseline": "hf"})

@pytest.mark.e2e
def test_peer_outputs_compare_by_text():
    """llama.cpp's tools print text: the same text read back in other ids is a match
    (" An" + "a" generated, " Ana" read back), other text is not, and our own methods
    still compare id for id."""
    from types import SimpleNamespace

    from ltd.bench.runner import _Loop
    from ltd.models import load_tokenizer_only, registry_gguf
    from ltd.registry import REGISTRY

    try:
        tok, _ = load_tokenizer_only("smollm2-135m", registry_gguf(REGISTRY["smollm2-135m"]))
    except LtdError as exc:
        pytest.skip(str(exc))
    loop = SimpleNamespace(engine=SimpleNamespace(target=SimpleNamespace(tokenizer=tok)))
    same = lambda label, ref, out: _Loop._same_output(loop, label, ref, out)  # noqa: E731
    ref = tok("The word is", add_special_tokens=False)["input_ids"] + tok.convert_tokens_to_ids(["ĠAn", "a"])
    merged = tok("The word is Ana", add_special_tokens=False)["input_ids"]
    assert ref != merged and tok.decode(ref) == tok.decode(merged)
    assert same("llama.cpp-spec:ngram-mod", ref, merged)
    assert not same("static:1x4x2", ref, merged)
    other = tok("The word is Anna", add_special_tokens=False)["input_ids"]
    assert not same("llama.cpp-spec:ngram-mod", ref, other)


def test_tie_margin_follows_the_dtype():
    """fp32 keeps the 1e-4 tie margin; a 16-bit dtype ties within a few rounding steps of the logit."""
    from types import SimpleNamespace

    import torch

    from ltd.bench.runner import TIE_MARGIN, tie_margin

    assert tie_margin(SimpleNamespace(dtype=torch.float32), 20.0) == TIE_MARGIN
    bf16 = tie_margin(SimpleNamespace(dtype=torch.bfloat16), 20.0)
    assert bf16 == pytest.approx(4 * 2**-7 * 20.0)  # bfloat16's eps is 2^-7
    assert bf16 > 0.25  # the margins of the bfloat16 differences measured on SmolLM2 (0 to 0.25) are ties
    assert tie_margin(SimpleNamespace(dtype=torch.bfloat16), 0.001) == TIE_MARGIN  # never below the fp32 margin
    assert tie_margin(SimpleNamespace(dtype=torch.float32, tie_margin=1.0), 20.0) == 1.0  # a backend's own, wider margin
    assert tie_margin(SimpleNamespace(), -30.0) == TIE_MARGIN  # no dtype known: fp32


def test_report_header_says_which_turns_ran():
    from ltd.bench.report import _turns

    assert _turns({"suites": ["alpaca", "qa"]}) == ", first turn"
    assert _turns({"suites": ["edit", "multiturn"]}) == ", first turn; every turn of multiturn"
    assert _turns({"suites": ["alpaca"], "multi_turn": True}) == ", all turns"
