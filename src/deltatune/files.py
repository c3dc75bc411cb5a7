"""Atomic writes: a file or a whole folder appears complete under its name, or not at all.

Temporary names are ``.NAME.XXXXXXXX`` beside NAME (:mod:`deltatune.outputs` recognises and removes those a
kill left behind). What is written gets the permissions the user's umask gives a new file or folder (the
temporary files Python creates are private, 0600/0700, which would make a delta unreadable to a serving
account or a colleague).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from deltatune.errors import DeltatuneError


def current_umask() -> int:
    """Return the process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a new folder or file gets under the umask (some writers,
    safetensors among them, create private files)."""
    mask = current_umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_atomic(path: Path, write: Callable[[Path], None], *, replace: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (same folder, atomic).

    Without ``replace`` the file is linked into place only if ``path`` does not exist at that moment (another
    process may have written it meanwhile): DeltatuneError then, and nothing is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise DeltatuneError(f"{path}: appeared while deltatune was writing it (another process?); nothing "
                                     "was replaced") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_folder_atomic(folder: Path, write: Callable[[Path], None], *, replace: bool = True) -> Path:
    """Call ``write(tmp_folder)`` on a hidden sibling folder, then put it in place of ``folder``; a failed write
    leaves ``folder`` as it was. Returns ``folder``.

    With ``replace`` an existing ``folder`` is removed first (only for folders deltatune owns: checkpoints,
    its cache). Without it the rename is the only step, and it fails, leaving everything as it was, when
    ``folder`` meanwhile became a file or a non-empty folder (another process wrote there): DeltatuneError.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        _follow_umask(tmp)
        if replace and folder.exists():
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise DeltatuneError(f"{folder}: appeared while deltatune was writing it (another process?); nothing "
                                 "was replaced: choose a new folder") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
