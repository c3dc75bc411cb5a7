"""Output folders: deltatune writes only into folders it may own, and clears only what it wrote itself.

    out = check_output_path(cfg.output.dir, "output.dir")      # not empty, not a file
    with lock_output(out, "output.dir"):                       # one writer at a time, for the run's life
        claim(out, "run")                                      # the marker that says "deltatune wrote this"
        ...

Three rules keep a user's files safe:

- A folder deltatune writes into carries a marker file (``.deltatune``, JSON: what kind of output, whether the
  demo made it). Only a marked folder is ever cleared, and only of the entries its kind writes; a folder
  holding anything else is refused, never cleared, whatever ``overwrite`` says.
- The current folder, the home folder, ``/`` and any parent of the current folder are never cleared.
- A writer holds an exclusive ``fcntl`` lock on ``.deltatune.lock`` inside the folder until it ends (the
  kernel drops it when the process dies, so a killed run leaves no stale lock); a second writer is refused
  with the first one's process id and command.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError, DeltatuneError

MARKER = ".deltatune"
LOCK = ".deltatune.lock"


def check_output_path(value: str | os.PathLike[str], key: str) -> Path:
    """Return ``value`` as a Path after checking it can name an output folder; raise ConfigError naming
    ``key`` when it is empty or names an existing file."""
    text = os.fspath(value)
    if not text.strip():
        raise ConfigError(f"{key}: empty; name a folder for the output, e.g. runs/my-run")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder; choose a folder name for the output")
    return path


def check_new_folder(value: str | os.PathLike[str], key: str) -> Path:
    """Return ``value`` as a Path for an output that must not replace anything (a merged model): absent or an
    empty folder; raise ConfigError naming ``key`` otherwise."""
    path = check_output_path(value, key)
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{key}: {path} exists and is not empty; deltatune never writes over it. Choose a new "
                          "folder")
    return path


def protected_reason(folder: Path) -> str | None:
    """Return why ``folder`` must never be cleared (the current folder, home, ``/``, a parent of the current
    folder), or None when it may be."""
    target = folder.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd:
        return "is the current folder"
    if target == Path.home().resolve():
        return "is your home folder"
    if target == Path(target.anchor):
        return "is the root of the filesystem"
    if target in cwd.parents:
        return "is a parent of the current folder"
    return None


def read_marker(folder: Path) -> dict[str, Any] | None:
    """Return the marker of a folder deltatune wrote (``{"kind": ..., ...}``), or None when it has none."""
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def claim(folder: Path, kind: str, **details: Any) -> None:
    """Write the marker saying deltatune owns ``folder`` as output of ``kind`` (``run``, ``compare``, ...)."""
    from deltatune.files import write_text_atomic

    marker = {"kind": kind, **details, "created": dt.datetime.now().isoformat(timespec="seconds")}
    write_text_atomic(folder / MARKER, json.dumps(marker) + "\n")


def foreign_entries(folder: Path, own: Iterable[str]) -> list[str]:
    """Return the names in ``folder`` that are neither in ``own`` nor deltatune's marker, lock or temporary
    files (``.NAME.*`` of an owned NAME), sorted."""
    owned = {*own, MARKER, LOCK}
    return sorted(p.name for p in folder.iterdir() if p.name not in owned and not _is_temporary(p.name, owned))


def _is_temporary(name: str, owned: set[str]) -> bool:
    # files.write_atomic / write_folder_atomic write ".NAME.XXXXXXXX" beside NAME
    return name.startswith(".") and any(name.startswith(f".{own}.") for own in owned)


def remove_temporaries(folder: Path, owned: Iterable[str]) -> list[str]:
    """Remove what a killed write left in ``folder``: ``.NAME.*`` temporaries of the ``owned`` names. Call it
    only while holding the folder's lock. Returns the names removed."""
    removed = []
    own = {*owned, MARKER}  # a marker write cut short too
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if _is_temporary(path.name, own):
            _remove(path)
            removed.append(path.name)
    return removed


def clear(folder: Path, owned: Iterable[str], key: str) -> None:
    """Remove the ``owned`` entries of a marked folder (the marker and lock stay). Refuses, naming ``key``,
    a protected folder (see :func:`protected_reason`) or one holding entries deltatune did not write."""
    reason = protected_reason(folder)
    if reason is not None:
        raise ConfigError(f"{key}: {folder} {reason}; deltatune never clears it. Choose a new folder, e.g. "
                          "runs/my-run")
    own = set(owned)
    foreign = foreign_entries(folder, own)
    if foreign:
        raise ConfigError(f"{key}: {folder} holds files deltatune did not write ({_names(foreign)}); it clears "
                          "only its own. Move them out, or choose another folder")
    for path in folder.iterdir():
        if path.name in own or _is_temporary(path.name, own):
            _remove(path)


def refuse_foreign(folder: Path, key: str, kind: str) -> None:
    """Raise ConfigError when ``folder`` exists, holds files and is not a deltatune output of ``kind``."""
    if not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
    if not entries:
        return
    marker = read_marker(folder)
    if marker is None:
        raise ConfigError(f"{key}: {folder} already holds files deltatune did not write ({_names(entries)}); "
                          "deltatune never writes into such a folder. Choose a new or empty folder")
    if marker["kind"] != kind:
        raise ConfigError(f"{key}: {folder} holds a deltatune {marker['kind']} output, not a {kind}; choose "
                          "another folder")


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class OutputLock:
    """An exclusive lock on an output folder, held until :meth:`release` (or the process ends)."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (closing the lock file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output(folder: Path, key: str) -> OutputLock:
    """Create ``folder`` if needed and lock it for this process; return the lock.

    Raises DeltatuneError naming ``key`` and the process that holds the lock when another writer has it, or
    when the folder cannot be created or written (a read-only place).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        raise DeltatuneError(f"{key}: cannot create or write {folder} (permission denied); choose a folder you "
                             "can write to") from None
    except OSError as err:
        raise DeltatuneError(f"{key}: cannot create or write {folder} ({err.strerror}); choose another "
                             "folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DeltatuneError(f"{key}: {folder} is in use by deltatune process {holder}; wait for it to end, or "
                             "choose another folder") from None
    os.ftruncate(fd, 0)
    command = " ".join(["deltatune", *sys.argv[1:]])[:200]
    os.pwrite(fd, f"{os.getpid()} ({command})\n".encode(), 0)
    return OutputLock(folder, fd)


@contextlib.contextmanager
def locked_output(folder: Path, key: str, kind: str) -> Any:
    """Refuse a folder holding another kind of output or foreign files, lock it, claim it for ``kind``, and
    hold the lock for the ``with`` block; yields the folder."""
    refuse_foreign(folder, key, kind)
    with lock_output(folder, key):
        if read_marker(folder) is None:
            claim(folder, kind)
        yield folder
