"""Benchmark harness: suites, methods (ours and peers), interleaved timing, reports.

``ltd bench`` measures every method in one process with the models loaded once, runs
them interleaved per prompt so that drift on a shared machine hits all methods alike,
and reports throughput as pairwise ratios to transformers' own ``generate`` (``hf``).
"""

from ltd.bench.methods import MethodSpec, parse_method, parse_methods
from ltd.bench.runner import BenchConfig, run_bench
from ltd.bench.suites import Question, load_questions, load_suites

__all__ = [
    "BenchConfig",
    "MethodSpec",
    "Question",
    "load_questions",
    "load_suites",
    "parse_method",
    "parse_methods",
    "run_bench",
]
