"""llama.cpp peers without the binary: spec parsing, commands, output parsing, skipping, build checks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ltd.errors import LtdError
from ltd.peers import llamacpp_build
from ltd.peers.llamacpp_build import TARGETS, LlamaCppBuild, build_llamacpp
from ltd.peers.llamacpp_spec import (
    SPEC_TYPES, PeerSpec, ToolRun, grid_peers, parse_peer_arg, parse_plain_run, parse_spec_run, spec_command,
)

# Trimmed from a real llama-speculative-simple run (SmolLM2, ngram-simple).
PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
STDOUT = "\n\n" + PROMPT + "Hello! How can I help you today?\n\n\n\n"
STDERR = """load_tensors: loading model tensors
encoded   12 tokens in    0.050 seconds, speed:  240.000 t/s
decoded   10 tokens in    0.200 seconds, speed:   50.000 t/s

n_draft   = 3
n_predict = 10
n_drafted = 12
n_accept  = 4
accept    = 33.333%
"""


@pytest.fixture()
def no_build(tmp_path, monkeypatch):
    """Point the peer cache at an empty directory: nothing is built."""
    monkeypatch.setattr(llamacpp_build, "peer_dir", lambda: tmp_path / "peers" / "llama.cpp-11434")
    return tmp_path / "peers" / "llama.cpp-11434"


# -- spec parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,typ,n", [("ngram-simple:8", "ngram-simple", 8), ("draft-eagle3", "draft-eagle3", 0),
                                        ("ngram-mod:16", "ngram-mod", 16), ("draft-simple:3", "draft-simple", 3)])
def test_parse_peer_arg(text, typ, n):
    spec = parse_peer_arg(text)
    assert (spec.type, spec.n) == (typ, n)
    assert spec.label == "llama.cpp-spec:" + text


def test_parse_method_llamacpp_spec():
    from ltd.bench.methods import parse_method, parse_methods

    spec = parse_method("llama.cpp-spec:ngram-simple:8")
    assert spec.is_llamacpp_spec and spec.label == "llama.cpp-spec:ngram-simple:8"
    labels = [m.label for m in parse_methods("llama.cpp-spec:ngram-mod,static:2x2x4")]
    assert labels == ["hf", "llama.cpp-spec:ngram-mod", "static:2x2x4"]


@pytest.mark.parametrize("text", ["llama.cpp-spec:warp-drive", "llama.cpp-spec", "llama.cpp-spec:ngram-simple:0",
                                  "llama.cpp-spec:ngram-simple:x", "llama.cpp-spec:draft-simple:999"])
def test_bad_peer_specs_are_one_line_errors(text):
    from ltd.bench.methods import parse_method

    with pytest.raises(LtdError) as err:
        parse_method(text)
    msg = str(err.value)
    assert "\n" not in msg
    if "warp-drive" in text or text.endswith("spec"):
        for typ in SPEC_TYPES:
            assert typ in msg


def test_type_args_select_type_and_draft_length():
    assert PeerSpec("ngram-simple", 8).type_args() == ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-m", "8"]
    assert PeerSpec("ngram-map-k", 4).type_args()[-2:] == ["--spec-ngram-map-k-size-m", "4"]
    assert PeerSpec("draft-simple", 6).type_args()[-2:] == ["--spec-draft-n-max", "6"]
    assert PeerSpec("ngram-mod", 16).type_args()[2:] == ["--spec-ngram-mod-n-max", "16", "--spec-ngram-mod-n-min", "12"]
    assert PeerSpec("draft-eagle3").type_args() == ["--spec-type", "draft-eagle3"]
    assert PeerSpec("none").type_args() == ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "1024"]
    with pytest.raises(LtdError, match="takes no N"):
        parse_peer_arg("none:3")


def test_grid_peers_cross_types_and_lengths():
    labels = [p.label for p in grid_peers(["ngram-simple", "draft-eagle3"], [3, 6])]
    assert labels == ["llama.cpp-spec:none", "llama.cpp-spec:ngram-simple:3", "llama.cpp-spec:ngram-simple:6",
                      "llama.cpp-spec:draft-eagle3:3", "llama.cpp-spec:draft-eagle3:6"]
    with pytest.raises(LtdError, match="unknown llama.cpp speculative type"):
        grid_peers(["ngram-typo"], [3])


def test_spec_command_is_greedy_and_passes_draft_model(tmp_path):
    cmd = spec_command(tmp_path / "bin", PeerSpec("draft-simple", 4), tmp_path / "t.gguf", PROMPT, 32, 200, 2,
                       draft_gguf=tmp_path / "d.gguf")
    assert cmd[cmd.index("--temp") + 1] == "0"
    assert cmd[cmd.index("-p") + 1] == PROMPT  # not -f: the tool strips a file's trailing newline
    # the tool would otherwise unescape a literal "\\n" (humaneval docstrings) and answer another prompt
    assert "--no-escape" in cmd
    # flash attention rounds differently from the backend's contexts (off there too)
    assert cmd[cmd.index("-fa") + 1] == "off" and "--no-repack" not in cmd
    assert "--no-repack" in spec_command(tmp_path / "bin", PeerSpec("ngram-simple"), tmp_path / "t.gguf", PROMPT, 32,
                                         200, 2, exact=True)
    assert cmd[cmd.index("-md") + 1] == str(tmp_path / "d.gguf")
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("-n") + 1] == "32"
    with pytest.raises(LtdError, match="needs a draft model"):
        spec_command(tmp_path / "bin", PeerSpec("draft-eagle3"), tmp_path / "t.gguf", PROMPT, 32, 200, 2)


# -- output parsing -------------------------------------------------------------------------


def test_parse_spec_run():
    run = parse_spec_run(STDOUT, STDERR, PROMPT)
    assert run.text == "Hello! How can I help you today?"
    assert (run.n_predict, run.n_drafted, run.n_accept) == (10, 12, 4)
    assert run.seconds == pytest.approx(0.25)
    assert run.cycles == 6 and run.acceptance_rate == pytest.approx(1 / 3)
    assert run.n_prompt == 12


def test_unexpected_echo_is_one_line():
    with pytest.raises(LtdError, match="did not echo the prompt"):
        parse_spec_run("\n\n" + PROMPT.replace("Hi", "Ho") + "Hello\n\n\n\n", STDERR, PROMPT)


def test_parse_spec_run_failure_is_one_line():
    with pytest.raises(LtdError) as err:
        parse_spec_run("", "llama_model_load: error loading model\nmain: failed to load\n", PROMPT)
    assert "failed to load" in str(err.value) and "\n" not in str(err.value)


def test_parse_plain_run():
    run = parse_plain_run(PROMPT + "Hello there\n", "main: decoded 3 tokens in 0.06 s, speed: 50.00 t/s\n", PROMPT)
    assert run.text == "Hello there" and run.n_predict == 3


def test_output_tokens_put_back_the_end_token():
    from ltd.peers.llamacpp_peer import output_tokens

    class Tok:
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    ended = ToolRun(text="abc", n_predict=4, seconds=1.0)
    assert output_tokens(Tok(), ended, 10, [2, 5]) == [97, 98, 99, 2]
    full = ToolRun(text="abcdefgh", n_predict=9, seconds=1.0)  # ran past -n: truncated, no end token
    assert output_tokens(Tok(), full, 5, [2]) == [97, 98, 99, 100, 101]


# -- build ------------------------------------------------------------------------------------


def test_missing_toolchain_is_one_line(no_build, monkeypatch):
    monkeypatch.setattr(llamacpp_build.shutil, "which", lambda name: None)
    with pytest.raises(LtdError) as err:
        build_llamacpp(jobs=1)
    msg = str(err.value)
    assert "cmake" in msg and "C++ compiler" in msg and "\n" not in msg


def test_second_build_is_instant(no_build, monkeypatch):
    b = LlamaCppBuild(no_build)
    for t in TARGETS:
        b.binary(t).parent.mkdir(parents=True, exist_ok=True)
        b.binary(t).write_text("")
    b.info_path.write_text(json.dumps({"build_seconds": 480.0, "cmake_flags": list(llamacpp_build.CMAKE_FLAGS)}))

    def boom(*a, **k):
        raise AssertionError("a finished build must not run anything")

    monkeypatch.setattr(llamacpp_build.subprocess, "run", boom)
    monkeypatch.setattr(llamacpp_build.subprocess, "Popen", boom)
    build, built_now = build_llamacpp(jobs=2)
    assert built_now is False and build.root == no_build
    assert llamacpp_build.find_build() is not None


def test_build_with_other_flags_is_not_complete(no_build):
    """A cache built with older cmake flags (e.g. with llamafile kernels) is rebuilt, not used."""
    b = LlamaCppBuild(no_build)
    for t in TARGETS:
        b.binary(t).parent.mkdir(parents=True, exist_ok=True)
        b.binary(t).write_text("")
    old = [f for f in llamacpp_build.CMAKE_FLAGS if "LLAMAFILE" not in f]
    b.info_path.write_text(json.dumps({"build_seconds": 480.0, "cmake_flags": old}))
    assert not b.is_complete() and llamacpp_build.find_build() is None
    b.info_path.write_text(json.dumps({"build_seconds": 480.0, "cmake_flags": list(llamacpp_build.CMAKE_FLAGS)}))
    assert b.is_complete()


def test_peers_cli_status_and_unknown_jobs(no_build, capsys):
    from ltd.cli import main

    assert main(["peers", "status", "llama.cpp"]) == 0
    assert "ltd peers build llama.cpp" in capsys.readouterr().out
    assert main(["peers", "build", "llama.cpp", "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err


# -- bench integration --------------------------------------------------------------------------


def _bench_args(argv):
    from ltd.bench.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def _questions(tmp_path) -> Path:
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 1, "category": "code", "turns": ["Say hi."]}) + "\n")
    return f


def test_bench_drops_unbuilt_peer_with_build_hint(tmp_path, no_build):
    from ltd.bench.cli import config_from_args

    cfg = config_from_args(_bench_args(["--questions", str(_questions(tmp_path)), "--methods",
                                        "ar,llama.cpp-spec:ngram-simple:4", "--out", str(tmp_path / "o")]))
    assert "llama.cpp-spec:ngram-simple:4" in [m.label for m in cfg.methods]
    lines = cfg.drop_unbuilt_peers()
    assert lines == ["skipping llama.cpp-spec:ngram-simple:4: llama.cpp's speculative tools are not built; "
                     "run: ltd peers build llama.cpp"]
    assert [m.label for m in cfg.methods] == ["hf", "ar"]
    assert cfg.skipped == lines


def test_grid_peers_adds_builtin_types(tmp_path):
    from ltd.bench.cli import config_from_args

    q = str(_questions(tmp_path))
    cfg = config_from_args(_bench_args(["--grid", "--grid-suite", q, "--grid-depths", "2", "--grid-sizes", "4",
                                        "--topk", "2", "--grid-peers", "--grid-peer-types", "ngram-simple,ngram-mod",
                                        "--grid-peer-lengths", "3,6", "--out", str(tmp_path / "o")]))
    assert [m.label for m in cfg.methods] == ["hf", "static:2x2x4", "llama.cpp-spec:none", "llama.cpp-spec:ngram-simple:3",
                                             "llama.cpp-spec:ngram-simple:6", "llama.cpp-spec:ngram-mod:3",
                                             "llama.cpp-spec:ngram-mod:6"]
    assert cfg.grid.peer_types == ["ngram-simple", "ngram-mod"] and cfg.grid.peer_lengths == [3, 6]
    with pytest.raises(LtdError, match="add --grid"):
        config_from_args(_bench_args(["--questions", q, "--grid-peers", "--out", str(tmp_path / "o")]))
    with pytest.raises(LtdError, match="greedy only"):
        config_from_args(_bench_args(["--questions", q, "--methods", "llama.cpp-spec:ngram-mod", "--temperature", "0.7",
                                      "--out", str(tmp_path / "o")]))


@pytest.mark.e2e
def test_bench_runs_without_unbuilt_peer(tmp_path, no_build):
    """A bench asked for an unbuilt peer runs the other methods and records the skip."""
    import torch

    from ltd.bench.methods import parse_methods
    from ltd.bench.runner import BenchConfig, run_bench
    from ltd.bench.suites import load_questions

    torch.set_num_threads(1)
    config = BenchConfig(model="smollm2-135m", drafter="none", methods=parse_methods("hf,llama.cpp-spec:ngram-simple:4"),
                         questions=load_questions(_questions(tmp_path)), repeats=1, max_new_tokens=4, progress=False)
    results = run_bench(config, out_dir=tmp_path / "out")
    assert list(results["methods"]) == ["hf"]
    assert any("ltd peers build llama.cpp" in line for line in results["skipped"])
    assert results["best_llamacpp_spec"] is None


def _bare_loop(methods, q):
    """A bench loop with no models: enough state for _record; the tokenizer writes ids as text."""
    from ltd.bench.methods import Sampling
    from ltd.bench.runner import BenchConfig, _Loop

    loop = _Loop.__new__(_Loop)
    text = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: " ".join(map(str, ids)))
    loop.engine = SimpleNamespace(target=SimpleNamespace(tokenizer=text))  # peers compare by text
    loop.config = BenchConfig(model="x", methods=methods, questions=[q])
    loop.sampling = Sampling(8)
    loop.runs, loop.references, loop.matches, loop.mismatches = [], {}, {}, {}
    return loop


def test_llamacpp_spec_is_compared_with_llamacpp_plain_when_present():
    """Same engine, same kernels: llama.cpp's speculation must equal llama.cpp's plain greedy."""
    from ltd.bench.methods import MethodSpec, parse_methods
    from ltd.bench.suites import Question
    from ltd.engine import GenerateResult

    def result(tokens):
        return GenerateResult("m", tokens, "", len(tokens), 1.0, float(len(tokens)), 1, 1.0)

    q = Question(suite="code", question_id="1", category="code", turns=("hi",))
    for with_plain in (True, False):
        methods = parse_methods("hf,llama.cpp-spec:ngram-mod")
        if with_plain:
            methods.insert(1, MethodSpec("llama.cpp"))
        loop = _bare_loop(methods, q)
        loop._record(q, "code/1", 0, "hf", [1], result([5, 6, 7]))
        if with_plain:
            loop._record(q, "code/1", 0, "llama.cpp", [1], result([5, 6, 9]))
        loop._record(q, "code/1", 0, "llama.cpp-spec:ngram-mod", [1], result([5, 6, 9]))
        assert loop.matches["llama.cpp-spec:ngram-mod"]["code/1"] is with_plain
        if not with_plain:
            assert loop.mismatches["llama.cpp-spec:ngram-mod"]["code/1"].reference_label == "hf"


def test_converter_failure_is_one_line_and_leaves_no_gguf(tmp_path):
    from ltd.peers.eagle3_gguf import convert_export, head_key

    build = LlamaCppBuild(tmp_path / "peer")
    build.converter.parent.mkdir(parents=True)
    build.converter.write_text("import sys\nprint('INFO: loading', file=sys.stderr)\n"
                               "print('ValueError: EAGLE-3 d2t contains duplicate target ids', file=sys.stderr)\n"
                               "sys.exit(1)\n")
    out = tmp_path / "head.gguf"
    with pytest.raises(LtdError) as err:
        convert_export(build, tmp_path / "head", tmp_path / "head" / "target", out)
    assert "rejected the EAGLE-3 export" in str(err.value) and "duplicate target ids" in str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "config.json").write_text("{}")
    key = head_key(tmp_path / "head")
    (tmp_path / "head" / "config.json").write_text('{"a": 1}')
    assert head_key(tmp_path / "head") != key  # a retrained head converts again


def test_llamacpp_spec_prefers_the_no_draft_reference():
    from ltd.bench.methods import MethodSpec, parse_methods
    from ltd.bench.suites import Question
    from ltd.engine import GenerateResult

    def result(tokens):
        return GenerateResult("m", tokens, "", len(tokens), 1.0, float(len(tokens)), 1, 1.0)

    q = Question(suite="code", question_id="1", category="code", turns=("hi",))
    methods = parse_methods("hf,llama.cpp-spec:ngram-mod:4,llama.cpp-spec:none")
    methods.insert(1, MethodSpec("llama.cpp"))
    loop = _bare_loop(methods, q)
    for label, toks in (("hf", [5, 6, 7]), ("llama.cpp", [5, 6, 8]), ("llama.cpp-spec:none", [5, 6, 9]),
                        ("llama.cpp-spec:ngram-mod:4", [5, 6, 9])):
        loop._record(q, "code/1", 0, label, [1], result(toks))
    assert loop.matches["llama.cpp-spec:ngram-mod:4"]["code/1"] is True  # equal to the same tool without drafts
    assert loop.matches["llama.cpp-spec:none"]["code/1"] is False  # itself compared with hf, across engines
