"""Read raw records from a data file or a hub data set, each tagged with where it came from.

    records = read_records("train.jsonl")   # [("train.jsonl:1", {...}), ("train.jsonl:2", {...}), ...]

Origins point a user at the record: ``path:LINE`` (1-based) for JSON-lines, CSV and TSV files;
``path:[i]`` (0-based index) for a JSON array; ``path:row N`` (0-based) for parquet and hub data sets.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltatune.errors import DataError

Record = tuple[str, dict[str, Any]]

SUPPORTED = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
HUB_PREFIX = "hub:"
# JSON keys whose list value is one example's content, not a list of examples
_RECORD_LIST_KEYS = frozenset({"messages", "conversations"})


def read_records(path: str, *, split: str = "train") -> list[Record]:
    """Read every record of a data file or ``hub:NAME[:config]`` data set.

    Returns ``(origin, record)`` pairs in file order. Raises DataError (with the file and line) for a
    missing file, an unsupported extension, malformed content, a non-object record or an empty file.
    """
    if path.startswith(HUB_PREFIX):
        return _read_hub(path, split)
    p = Path(path)
    try:
        exists = p.exists()
    except OSError as err:  # e.g. a folder on the way that may not be searched
        raise _unreadable(p, err) from None
    if not exists:
        raise DataError(f"{path}: file not found; check the path (relative paths start at the working folder)")
    if p.is_dir():
        raise DataError(f"{path}: is a folder; give one data file ({', '.join(SUPPORTED)})")
    suffix = p.suffix.lower()
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_tsv,
               ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
                        f"use one of {', '.join(SUPPORTED)} or hub:NAME")
    records = readers[suffix](p)
    if not records:
        raise DataError(f"{path}: no examples in the file; add at least one")
    return records


def _unreadable(path: Path, err: OSError) -> DataError:
    """The DataError for a data file the system will not let us read (permissions, I/O error, ...)."""
    if isinstance(err, PermissionError):
        return DataError(f"{path}: cannot read (permission denied); give yourself read access "
                         f"(chmod u+r {path}) or copy the file somewhere you can read it")
    reason = (err.strerror or str(err) or type(err).__name__).lower()
    return DataError(f"{path}: cannot read ({reason}); check the path and that the file is readable")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "save the file as UTF-8") from None
    except OSError as err:
        raise _unreadable(path, err) from None


def _check_object(origin: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{origin}: expected a JSON object per example, got {type(value).__name__}; "
                        "write each example as {\"field\": value, ...}")
    return value


def _jsonl_records(path: Path, text: str) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                            "fix or remove the line") from None
        yield f"{path}:{number}", _check_object(f"{path}:{number}", value)


def _read_jsonl(path: Path) -> list[Record]:
    return list(_jsonl_records(path, _read_text(path)))


def _read_json(path: Path) -> list[Record]:
    """A JSON array, an object holding a single list of examples, or JSON-lines content."""
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON-lines content in a .json file
            return _read_jsonl(path)
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                        "fix the file") from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) == 1 and lists[0] not in _RECORD_LIST_KEYS:
            return [(f"{path}:{lists[0]}[{i}]", _check_object(f"{path}:{lists[0]}[{i}]", item))
                    for i, item in enumerate(value[lists[0]])]
        return [(f"{path}:1", value)]  # one example on its own
    if isinstance(value, list):
        return [(f"{path}:[{i}]", _check_object(f"{path}:[{i}]", item)) for i, item in enumerate(value)]
    raise DataError(f"{path}: expected a JSON array of examples, got {type(value).__name__}")


def _read_delimited(path: Path, delimiter: str) -> list[Record]:
    # TSV files (GLUE style) are not quoted: a quote character is text, as in SST-2
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    records: list[Record] = []
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as err:
        raise _unreadable(path, err) from None
    with handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None)
            if header is None:
                return []
            header = [h.strip() for h in header]
            if len(set(header)) != len(header) or not all(header):
                raise DataError(f"{path}:1: the header row needs unique, non-empty column names "
                                f"(got {header})")
            start = reader.line_num + 1
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{line}: {len(row)} values but the header has {len(header)} "
                                    f"columns ({', '.join(header)}); fix the line"
                                    + ("" if delimiter == "\t" else " or quote values that contain commas"))
                records.append((f"{path}:{line}", dict(zip(header, row, strict=True))))
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} "
                            f"({err}); fix the line") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason}); save the file as UTF-8") from None
        except OSError as err:
            raise _unreadable(path, err) from None
    return records


def _read_csv(path: Path) -> list[Record]:
    return _read_delimited(path, ",")


def _read_tsv(path: Path) -> list[Record]:
    return _read_delimited(path, "\t")


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read as parquet ({err}); check the file") from None
    return [(f"{path}:row {i}", row) for i, row in enumerate(rows)]


def _read_hub(spec: str, split: str) -> list[Record]:
    """``hub:NAME`` or ``hub:NAME:CONFIG`` through the `datasets` library (needs the network or its cache)."""
    name, _, config = spec[len(HUB_PREFIX):].partition(":")
    if not name:
        raise DataError(f"{spec}: no data set name; write hub:NAME or hub:NAME:CONFIG")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading hub data sets needs the `datasets` package; "
                        "pip install 'deltatune[hub]', or download the data to a .jsonl file") from None
    try:
        data = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # offline, unknown name or split: the library raises many types
        raise DataError(f"{spec}: cannot load split {split!r} ({type(err).__name__}: {err}); check the name "
                        "and data.split, and that you are online (or the data set is cached)") from None
    return [(f"{spec}:{split}:row {i}", _check_object(f"{spec}:{split}:row {i}", dict(row)))
            for i, row in enumerate(data)]
