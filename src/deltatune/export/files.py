"""Where an export goes: a new file (or, with ``--force``, a GGUF file it replaces), written whole or not at all.

deltatune replaces only what it can tell it wrote: with ``--force`` a file that starts with the GGUF magic bytes,
and a Modelfile that starts with deltatune's header line. Never a folder, never another kind of file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf

from deltatune.errors import DeltatuneError
from deltatune.export.modelfile import HEADER
from deltatune.files import write_atomic, write_text_atomic

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFTarget:
    """A checked output path for a GGUF file."""

    path: Path
    force: bool

    @classmethod
    def check(cls, out: str | os.PathLike[str], *, force: bool) -> GGUFTarget:
        """Return the target for ``out``; raise DeltatuneError when it is empty, a folder, an existing file
        without ``force``, or (with ``force``) an existing file that is not GGUF."""
        text = os.fspath(out)
        if not text.strip():
            raise DeltatuneError("-o: empty; name the GGUF file to write, e.g. -o model.gguf")
        path = Path(text).expanduser()
        if path.is_dir():
            raise DeltatuneError(f"-o: {path} is a folder; name the GGUF file to write, e.g. -o {path / 'model.gguf'}")
        if path.exists():
            if not force:
                raise DeltatuneError(f"-o: {path} exists; pass --force to replace it, or choose another name")
            if not _starts_with(path, GGUF_MAGIC):
                raise DeltatuneError(f"-o: {path} exists and is not a GGUF file; deltatune replaces only GGUF files, "
                                     "even with --force: choose another name")
        return cls(path, force)

    @staticmethod
    def check_modelfile(path: Path, *, force: bool) -> None:
        """Raise DeltatuneError when ``path`` exists and may not be replaced (without ``force``, or not written
        by deltatune)."""
        if path.is_dir() or (path.exists() and not (force and _starts_with(path, HEADER.encode()))):
            raise DeltatuneError(f"--ollama: {path} exists; deltatune replaces only a Modelfile it wrote, with "
                                 "--force: move it or write the GGUF into another folder")

    @staticmethod
    def write_modelfile(path: Path, text: str) -> None:
        """Write the Modelfile (whole or not at all)."""
        write_text_atomic(path, text)


def write_gguf(target: GGUFTarget, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> None:
    """Write a GGUF file for architecture ``arch``: ``fill(writer)`` adds the metadata and tensors; the file
    appears at ``target.path`` only when complete (a failed write, a full disk, leaves nothing)."""
    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(path=None, arch=arch)
        fill(writer)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        write_atomic(target.path, write, replace=target.force)
    except OSError as err:
        raise DeltatuneError(f"-o: cannot write {target.path} ({err.strerror or err}); nothing was written") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
