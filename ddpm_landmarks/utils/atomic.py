"""Atomic file writes: a reader (or a killed job) sees the old file or the new one, never half.

Write to a temporary file in the same folder, fsync, then os.replace() it into place; rename
is atomic on POSIX filesystems when source and target share a folder.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's data to disk (a folder: its entries, i.e. renames in it).
    Harmless where a folder cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `out_dir`; fill it; on success it replaces `out_dir`.

    Every file is fsynced, then a previous out_dir is renamed aside, the new folder renamed
    into place and the old one removed: out_dir is, at any moment, the old folder, the new one,
    or (between two renames) missing -- never half-written. On an exception nothing changes.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _fsync_files(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def directory_once(out_dir: str | Path) -> Iterator[Path]:
    """Like atomic_directory for a folder that never changes once made (generated data): when
    several processes make it at once, the first rename wins and the others' copies are
    dropped, so a reader never finds it missing (atomic_directory replaces an existing one)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _fsync_files(tmp)
        try:
            os.rename(tmp, out_dir)     # fails on an existing non-empty folder (POSIX)
        except OSError:
            if not out_dir.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_files(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fsync_path(f)


def move_contents_aside(folder: Path, names: list[str]) -> Path:
    """Move `names` (entries of `folder`) into a new, empty <folder>.replaced-<time>[-n] beside
    it (run.overwrite=true: the old run is kept, never mixed with the new one; two overwrites in
    one second get two folders). Returns that folder."""
    folder = Path(folder)
    stem = f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        aside = folder.with_name(stem if n == 0 else f"{stem}-{n}")
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free <name>.replaced-<time>-n folder beside {folder}")
    for name in names:
        os.replace(folder / name, aside / name)
    return aside
