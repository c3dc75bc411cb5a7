"""Atomic writes: complete under the final name, or nothing changed and nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltatune.files import write_atomic, write_folder_atomic, write_text_atomic


def test_a_folder_replaces_the_old_one_only_when_its_write_finished(tmp_path: Path) -> None:
    out = tmp_path / "model"
    write_folder_atomic(out, lambda tmp: (tmp / "a.txt").write_text("one"))
    assert (out / "a.txt").read_text() == "one"

    def broken(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(out, broken)
    assert (out / "a.txt").read_text() == "one"  # the old folder is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left

    assert write_folder_atomic(out, lambda tmp: (tmp / "b.txt").write_text("two")) == out
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced whole, not merged


def test_a_file_write_that_fails_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    write_text_atomic(path, "a: 1\n")

    def broken(tmp: Path) -> None:
        tmp.write_text("a: ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_text() == "a: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
