"""Atomic, durable file writes: a reader sees the old file or the new one, never half of one.

Data is flushed to disk (fsync) before a rename puts it in place, and the directory after it, so a
power cut cannot leave a renamed but empty file. A write that fails (a full disk, a read-only
directory) raises `WriteError`, one line naming the path; the old file is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steerlens.errors import SteerlensError


class WriteError(SteerlensError, OSError):
    """A file could not be written (e.g. no space left); what was on disk before is intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _reported(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` into a one-line `WriteError`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(
            f"could not write {path}: {err.strerror or err}; nothing that was there before was changed"
        ) from err


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed and renamed over `path`."""
    path = Path(path)
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            _fsync(Path(tmp))
            os.replace(tmp, path)
            _fsync(path.parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success its files are flushed and it replaces `path` whole."""
    path = Path(path)
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            for item in sorted(tmp.rglob("*"), reverse=True):  # files before the directories holding them
                _fsync(item)
            _fsync(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            _fsync(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, default=str) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write `rows` as JSON lines, atomically (replacing the file)."""
    write_text(path, _jsonl(rows))


def append_jsonl(path: str | Path, rows: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
    """Append one JSON line per row in a single write and flush it to disk (a crash loses at most the
    lines being written; readers drop a torn last line). On a failed write the file is cut back to
    its old length (or removed, if this call created it), so no partial line stays behind."""
    path = Path(path)
    rows = [rows] if isinstance(rows, dict) else rows
    data = _jsonl(rows).encode()
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                if existed:
                    os.ftruncate(fd, start)
                else:
                    os.unlink(path)
                raise
        finally:
            os.close(fd)


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a JSONL file and whether its last line was torn (and so dropped from the file).

    A damaged line before the last one is not a torn write: it raises, naming the line.
    """
    if not path.is_file():
        return [], False
    lines = path.read_text().splitlines()
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise SteerlensError(
                    f"{path}: line {number} is damaged ({err.msg}); only a torn last line can be repaired"
                ) from err
            write_jsonl(path, rows)
            return rows, True
    return rows, False
