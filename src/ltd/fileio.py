"""Atomic file writes: write a temporary file in the same directory, then ``os.replace``.

A process killed mid-write leaves the old file (or none), never a truncated one, which
is what makes the recorder and the trainer resumable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ltd.errors import LtdError


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one step.

    ``suffix`` is the temporary file's ending; some writers (numpy's ``savez``) append
    their own extension unless the name already ends with it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``; user-facing errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise LtdError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LtdError(f"{what} {path} is not valid JSON ({exc}); recreate it") from None
    if not isinstance(data, dict):
        raise LtdError(f"{what} {path} does not hold a JSON object; recreate it")
    return data


def atomic_dir(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` and swap the finished directory in for ``path``.

    A reader never sees a half-written directory: it is built next to the target and
    renamed into place; a failure leaves the previous directory untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix="." + path.name + ".tmp"))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
