"""Benchmark questions: SpecBench-style ``question.jsonl`` files, validated line by line.

Every line is one JSON object with ``question_id``, ``category`` and ``turns`` (a list of
user turns). A malformed file is a user error, so the message names the file and the
line to fix instead of surfacing a KeyError deep inside the timing loop.

Suites live in ``DIR/<suite>/question.jsonl``. The package carries its own copy of every
suite (``ltd/assets/bench``), so a clone or an installed wheel benchmarks with no data
download; ``--data-dir`` points at another folder of the same layout. With internet,
``load_hub_suite`` builds the six SpecBench suites from the original Hugging Face datasets.

Six suites are SpecBench-style (chat, code, math, instructions, QA, summaries): drafts are
mediocre everywhere on them. Three are copy-heavy, built from CPython standard-library
code and docstrings, where a model-free drafter is right many tokens at a time: ``edit``
(change a function in the prompt and return it whole), ``rag`` (answer about a passage by
quoting it) and ``multiturn`` (a second turn revises the first answer, so both turns
always run). ``mixed`` is no file but a stream: all nine suites interleaved in a fixed,
seeded order, the unit real, mixed work is judged on.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ltd.errors import LtdError

log = logging.getLogger(__name__)

SPECBENCH_SUITES = ("mt_bench", "humaneval", "gsm8k", "alpaca", "qa", "sum")
COPY_SUITES = ("edit", "rag", "multiturn")
SUITES = SPECBENCH_SUITES + COPY_SUITES
MIXED = "mixed"  # all SUITES interleaved (see mixed_stream)
MIXED_SEED = 0
# suites whose later turns are the point (a revision of the first answer): always run whole
ALL_TURN_SUITES = ("multiturn",)
QUESTION_FILE = "question.jsonl"
# Questions from this index on are every suite's training split: policies are trained on
# them (``ltd record --offset 10``) and judged on the first ones (``ltd bench --limit N``,
# N <= 10), so a policy is never scored on a prompt it was trained on.
TRAIN_OFFSET = 10
PACKAGED_DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "bench"


@dataclass(frozen=True)
class Question:
    """One benchmark question; ``suite`` groups the per-suite breakdown of the report."""

    suite: str
    question_id: str | int
    category: str
    turns: tuple[str, ...]
    all_turns: bool = False  # run every turn even without --multi-turn (the multiturn suite)

    @property
    def key(self) -> str:
        """A stable identifier, unique across suites."""
        return f"{self.suite}/{self.question_id}"

    def turn_key(self, turn: int) -> str:
        """The identifier of user turn ``turn`` (0-based): the question's key for the first."""
        return self.key if turn == 0 else f"{self.key}/turn{turn + 1}"


def parse_suite_list(text: str) -> list[str]:
    """``"mt_bench,gsm8k"`` -> names, each checked against the known suites (or ``mixed`` alone)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = ", ".join(SUITES + (MIXED,))
    if not names:
        raise LtdError(f"--suites is empty; choose from {known}")
    for name in names:
        if name not in SUITES and name != MIXED:
            raise LtdError(f"unknown suite {name!r}; choose from {known} or pass --questions FILE.jsonl")
    if len(set(names)) != len(names):
        raise LtdError(f"--suites names a suite twice ({text}); list each once")
    if MIXED in names and len(names) > 1:
        raise LtdError(f"--suites {text}: {MIXED} already holds every suite; pass it alone")
    return names


def _parse_line(line: str, path: Path, lineno: int) -> tuple[str | int, str, tuple[str, ...]]:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LtdError(f"{where}: not valid JSON ({exc.msg}); fix or remove that line") from None
    if not isinstance(obj, dict):
        raise LtdError(f"{where}: expected a JSON object with question_id, category, turns; fix that line")
    missing = [k for k in ("question_id", "category", "turns") if k not in obj]
    if missing:
        raise LtdError(f"{where}: missing field(s) {', '.join(missing)}; every line needs question_id, category, turns")
    qid = obj["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or (isinstance(qid, str) and not qid.strip()):
        raise LtdError(f"{where}: question_id must be an integer or a non-empty string, got {qid!r}")
    category = obj["category"]
    if not isinstance(category, str):
        raise LtdError(f"{where}: category must be a string, got {category!r}")
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns:
        raise LtdError(f"{where}: turns must be a non-empty list of strings")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise LtdError(f"{where}: turns[{i}] must be a non-empty string")
    return qid, category, tuple(turns)


def load_questions(path: str | Path, suite: str | None = None, limit: int | None = None, offset: int = 0) -> list[Question]:
    """Read and validate a question file.

    ``suite`` names the group every question belongs to; when None (``--questions``),
    each question's ``category`` is its group, so one SpecBench file with all categories
    still gets a per-category breakdown. ``limit`` keeps the first N questions of each
    group, after skipping the first ``offset`` of each group.
    """
    if offset < 0:
        raise LtdError(f"--offset must be at least 0, got {offset}")
    path = Path(path)
    if not path.is_file():
        raise LtdError(f"question file {path} does not exist; check --questions / --data-dir")
    questions: list[Question] = []
    seen: dict[str | int, int] = {}
    counts: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            qid, category, turns = _parse_line(line, path, lineno)
            if qid in seen:
                raise LtdError(f"{path}:{lineno}: question_id {qid!r} already used on line {seen[qid]}; make ids unique")
            seen[qid] = lineno
            group = suite if suite is not None else (category or path.stem)
            index = counts.get(group, 0)
            counts[group] = index + 1
            if index < offset or (limit is not None and index >= offset + limit):
                continue
            questions.append(Question(group, qid, category, turns))
    if not questions:
        if offset and counts:
            raise LtdError(f"{path} has no questions after --offset {offset} (it holds {max(counts.values())}); lower --offset")
        raise LtdError(f"{path} holds no questions; it needs one JSON object a line")
    return questions


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The suite directory to use: ``data_dir`` if given, else the package's own copy."""
    if data_dir is None:
        return PACKAGED_DATA_DIR
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise LtdError(f"--data-dir {path} is not a directory; point it at the folder holding <suite>/question.jsonl")
    return path


def load_suites(names: Sequence[str], data_dir: str | Path | None = None, limit: int | None = None, offset: int = 0) -> list[Question]:
    """Questions of the named suites from ``DIR/<suite>/question.jsonl``, suite by suite
    (``limit`` of each after skipping ``offset``).

    ``["mixed"]`` gives :func:`mixed_stream` over every suite instead.
    """
    if list(names) == [MIXED]:
        return mixed_stream(data_dir, limit=limit, offset=offset)
    base = resolve_data_dir(data_dir)
    questions: list[Question] = []
    for name in names:
        path = base / name / QUESTION_FILE
        if not path.is_file():
            raise LtdError(f"suite {name!r} has no {path}; check --data-dir or drop it from --suites")
        loaded = load_questions(path, suite=name, limit=limit, offset=offset)
        if name in ALL_TURN_SUITES:
            loaded = [Question(q.suite, q.question_id, q.category, q.turns, all_turns=True) for q in loaded]
        questions.extend(loaded)
    log.info("loaded %d questions from %s (%s)", len(questions), base, ", ".join(names))
    return questions


def mixed_stream(data_dir: str | Path | None = None, limit: int | None = None, seed: int = MIXED_SEED, offset: int = 0) -> list[Question]:
    """Every suite's questions (``limit`` of each, after ``offset``) interleaved in a fixed, seeded order.

    Real work alternates free text, where drafts are weak, with copy-heavy turns, where a
    model-free drafter is right many tokens at a time; a policy is judged on that mixture,
    not on one homogeneous suite. The order is a seeded shuffle, so every run (and every
    machine) sees the same stream; each question keeps its suite for the breakdown, and
    multiturn questions keep both turns.
    """
    return interleave(load_suites(SUITES, data_dir, limit=limit, offset=offset), seed)


def interleave(questions: Sequence[Question], seed: int = MIXED_SEED) -> list[Question]:
    """The questions in a fixed, seeded order (a stream that alternates their suites).

    Each question's turns stay together, in order."""
    shuffled = list(questions)
    random.Random(seed).shuffle(shuffled)
    return shuffled


# -- Hugging Face hub (needs internet and the `datasets` package; not testable offline) ----

# suite -> (dataset id, config, split, category, row -> first user turn)
_HUB_SOURCES = {
    "mt_bench": ("HuggingFaceH4/mt_bench_prompts", None, "train", None, None),
    "humaneval": ("openai/openai_humaneval", None, "test", "code", lambda r: "Complete the code I provided.\n\n" + r["prompt"]),
    "gsm8k": ("openai/gsm8k", "main", "test", "math", lambda r: r["question"]),
    "alpaca": (
        "tatsu-lab/alpaca",
        None,
        "train",
        "writing",
        lambda r: r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""),
    ),
    "qa": ("google-research-datasets/nq_open", None, "validation", "qa", lambda r: r["question"]),
    "sum": ("abisee/cnn_dailymail", "3.0.0", "test", "summarization", lambda r: "Summarize the following article.\n\n" + r["article"]),
}


def load_hub_suite(name: str, limit: int | None = 80) -> list[Question]:
    """Build a suite from its original dataset on the Hugging Face hub (SpecBench sources)."""
    if name not in _HUB_SOURCES:
        raise LtdError(f"suite {name!r} has no Hugging Face source (only {', '.join(_HUB_SOURCES)}); drop --from-hub to use the shipped copy")
    try:
        import datasets  # noqa: PLC0415 - optional, only needed for the hub path
    except ImportError:
        raise LtdError("--from-hub needs the datasets package: pip install datasets") from None
    repo, config, split, category, turn = _HUB_SOURCES[name]
    n = limit or 80
    try:
        rows = datasets.load_dataset(repo, config, split=f"{split}[:{n}]")
    except Exception as exc:  # network and hub errors come in many types
        raise LtdError(f"cannot load {repo} from the hub ({type(exc).__name__}); check the network or use --data-dir") from None
    questions = []
    for i, row in enumerate(rows):
        if name == "mt_bench":
            questions.append(Question(name, row.get("prompt_id", i), row.get("category", ""), tuple(row["prompt"])))
        else:
            questions.append(Question(name, i, category, (turn(row),)))
    return questions
