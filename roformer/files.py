"""The small file and text helpers every module shares, written once so that the copies cannot drift.

* :func:`atomic_write` is the one way a result, report, plot, tokenizer or checkpoint reaches the disk: a
  temporary file in the same folder, fsync, rename, fsync of the folder. A crash at any point leaves the old
  file or the new one, never a partial one, and the new file gets the permissions a plain ``open()`` would give
  (0644 under umask 022), not ``mkstemp``'s 0600, so collaborators on shared storage can read it.
* :func:`ensure_writable` makes a folder and proves it can be written, and :func:`check_creatable` proves one
  could be made without making it; both raise a one-line ``ValueError`` that names the folder, the cause and the
  setting to change.
* :func:`one_line` turns an exception into one short line for people.
* :func:`to_plain` turns config dataclasses into the dicts that checkpoints, result files and dashboards hold.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[IO[bytes]], object]) -> Path:
    """Write ``content`` to ``path`` atomically and return the path.

    ``content`` is text (written as UTF-8), bytes, or a function that writes to the binary file object it is
    given (``torch.save``, ``fig.savefig``). The folder must exist. On any failure the temporary file is removed
    and the previous ``path``, if any, is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _probe(folder: Path) -> None:
    """Raise ``OSError`` unless a file can be made in the existing folder ``folder``."""
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder")
    with tempfile.TemporaryFile(dir=folder):
        pass


def ensure_writable(folder: str | os.PathLike, setting: str, error: type[ValueError] = ValueError) -> Path:
    """Create ``folder`` (with parents) and check a file can be made in it.

    Raises ``error`` (a ``ValueError`` subclass) in one line naming the folder, the cause and ``setting``, the
    key to change (e.g. ``hydra.run.dir`` or ``data.cache_dir``).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _probe(folder)
    except OSError as e:
        raise error(f"folder {folder} cannot be written ({e.strerror or e}); "
                    f"choose another with {setting}=...") from None
    return folder


def check_creatable(folder: str | os.PathLike, setting: str) -> None:
    """Check, creating nothing, that ``folder`` could be made and written: its nearest existing parent must be a
    writable folder. Raises ``ValueError`` in one line naming the folder, the cause and ``setting``."""
    parent = Path(folder).absolute()
    while not parent.exists():
        parent = parent.parent
    try:
        _probe(parent)
    except OSError as e:
        raise ValueError(f"output folder {folder} cannot be created ({e.strerror or e} in {parent}); "
                         f"choose another with {setting}=...") from None


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """An exception (or text) as one line of at most ``limit`` characters; the type name when it is empty."""
    s = " ".join(str(e).split())
    if not s and isinstance(e, BaseException):
        s = type(e).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (where libraries put the cause), or its type name when empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def to_plain(obj) -> object:
    """Dataclasses, enums and paths -> dicts, strings and numbers (for checkpoints, result files, dashboards)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj
