"""Writing artifacts so that a crash never leaves something Make takes as done.

Every file or folder a stage produces is written under a temporary name in
the same folder and renamed into place only when complete (a rename within
one filesystem is atomic). Temporary names start with `.tmp-`, so a crashed
run's leftovers are easy to recognise and never match a Make target.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path | str, *, directory: bool = False) -> None:
    """Give a temp file/folder the mode a plain open()/mkdir() would have.

    mkstemp/mkdtemp create 0600/0700 entries; artifacts are meant to be read
    by others (an Ollama server, a container user), so undo that.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` (readable by others, like an open()
    would make it); when the block succeeds it is synced and renamed to `path`.
    On an exception it is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # No braces in the temporary name: llama.cpp's converter expands {ftype}-style templates.
    stem = path.name.replace("{", "_").replace("}", "_")
    fd, name = tempfile.mkstemp(prefix=f".tmp-{stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        publish_mode(tmp)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` only when it differs from the file's content.

    Returns True when the file was (re)written. Leaving an unchanged file
    alone keeps its mtime, which is what lets Make skip what depends on it.
    """
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes `final` when the block succeeds.

    An existing `final` is replaced only after the new one is complete. On an
    exception the temporary folder is removed and `final` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
    publish_mode(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = final.parent / f".tmp-old-{final.name}.{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
