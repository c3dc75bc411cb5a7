"""Reading data files and converting formats: every file type, every format, every error path."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltatune.data import Message, detect_format, load_examples, read_records, to_examples
from deltatune.errors import DataError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference data folder {SHARED} is missing")

SAMPLES: dict[str, list[dict[str, Any]]] = {
    "alpaca": [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "Hi!"}],
    "messages": [{"messages": [{"role": "user", "content": "Hello"},
                               {"role": "assistant", "content": "Hi there"}]},
                 {"messages": [{"role": "system", "content": "Be short."},
                               {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hey"}]},
                 {"conversations": [{"from": "user", "value": "Q"}, {"from": "chatgpt", "value": "A"}]}],
    "prompt_completion": [{"prompt": "The sky is", "completion": " blue"},
                          {"prompt": "Grass is", "completion": " green"}],
    "classification": [{"sentence": "great film", "label": 1}, {"sentence": "dull", "label": 0}],
    "text": [{"text": "Once upon a time."}, {"text": "The end."}],
}
FLAT = ("alpaca", "prompt_completion", "classification", "text")  # formats a CSV/TSV can hold


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write records in the file type named by the path's extension."""
    kind = path.suffix
    if kind == ".json":
        path.write_text(json.dumps(records, indent=1))
    elif kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]),
                                    delimiter="\t" if kind == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(records)
    return path


FILE_CASES = [(fmt, ext) for fmt in SAMPLES for ext in (".json", ".jsonl", ".parquet", ".csv", ".tsv")
              if ext in (".json", ".jsonl", ".parquet") or fmt in FLAT]


@pytest.mark.parametrize(("fmt", "ext"), FILE_CASES)
def test_every_format_from_every_file_type(tmp_path: Path, fmt: str, ext: str) -> None:
    path = write(tmp_path / f"data{ext}", SAMPLES[fmt])
    examples = load_examples(str(path))
    assert len(examples) == 2
    first = examples[0]
    expected_origin = {".json": f"{path}:[0]", ".jsonl": f"{path}:1", ".parquet": f"{path}:row 0",
                       ".csv": f"{path}:2", ".tsv": f"{path}:2"}[ext]
    assert first.origin == expected_origin
    if fmt == "text":
        assert (first.text, first.messages, first.label) == ("Once upon a time.", None, None)
    elif fmt == "classification":
        assert first.text == "great film"
        assert str(first.label) == "1"  # an int from json/parquet, the string "1" from CSV/TSV
        assert first.messages is None
    else:
        assert first.messages is not None and first.messages[-1].role == "assistant"
        assert load_examples(str(path), fmt) == examples  # explicit format == detected format


def test_alpaca_joins_instruction_and_input() -> None:
    examples = to_examples([("a:1", SAMPLES["alpaca"][0]), ("a:2", SAMPLES["alpaca"][1])])
    assert examples[0].messages == [Message("user", "Add the numbers.\n\n2 and 3"), Message("assistant", "5")]
    assert examples[1].messages == [Message("user", "Say hi."), Message("assistant", "Hi!")]
    with_system = to_examples([("a:1", {**SAMPLES["alpaca"][1], "system": "Be kind."})])[0]
    assert with_system.messages is not None and with_system.messages[0] == Message("system", "Be kind.")


def test_sharegpt_roles_and_system_field() -> None:
    record = {"system": "S", "conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"},
                                               {"from": "user", "value": "u2"},
                                               {"from": "assistant", "value": "a2"}]}
    [ex] = to_examples([("s:1", record)])
    assert ex.messages is not None
    assert [m.role for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.content for m in ex.messages] == ["S", "u", "a", "u2", "a2"]


def test_prompt_completion_and_pairs() -> None:
    [ex] = to_examples([("p:1", SAMPLES["prompt_completion"][0])])
    assert ex.messages == [Message("user", "The sky is"), Message("assistant", " blue")]
    [pair] = to_examples([("c:1", {"sentence1": "a b", "sentence2": "c d", "label": "entailment"})])
    assert (pair.text, pair.text_pair, pair.label) == ("a b", "c d", "entailment")
    [floaty] = to_examples([("c:1", {"text": "x", "label": 2.0})])
    assert floaty.label == 2 and isinstance(floaty.label, int)


def test_system_prompt_added_only_where_missing() -> None:
    records = [("m:1", SAMPLES["messages"][0]), ("m:2", SAMPLES["messages"][1])]
    first, second = to_examples(records, system_prompt="You are terse.")
    assert first.messages is not None and second.messages is not None
    assert first.messages[0] == Message("system", "You are terse.")
    assert second.messages[0] == Message("system", "Be short.")
    [text] = to_examples([("t:1", {"text": "plain"})], system_prompt="ignored")
    assert text.messages is None


def test_weights_are_kept() -> None:
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]}
    [ex] = to_examples([("w:1", record)])
    assert ex.messages is not None
    assert [m.weight for m in ex.messages] == [None, 0.0, None, 1.0]


@pytest.mark.parametrize(("record", "fmt"), [(r[0], f) for f, r in SAMPLES.items()])
def test_detect_format(record: dict[str, Any], fmt: str) -> None:
    assert detect_format(record, "x:1") == fmt


def test_detect_format_unknown_names_the_fields() -> None:
    with pytest.raises(DataError, match=r"^f.jsonl:7: cannot tell the format from fields \['answer', 'question'\]"
                                        r"; set data.format"):
        detect_format({"question": "q", "answer": "a"}, "f.jsonl:7")


# ---------------------------------------------------------------- errors in files

def test_malformed_jsonl_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON \("):
        read_records(str(path))


def test_jsonl_origins_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "a"}\n\n\n{"text": "b"}\n')
    assert [o for o, _ in read_records(str(path))] == [f"{path}:1", f"{path}:4"]


def test_json_variants(tmp_path: Path) -> None:
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": [{"text": "a"}, {"text": "b"}]}))
    assert [o for o, _ in read_records(str(wrapped))] == [f"{wrapped}:data[0]", f"{wrapped}:data[1]"]
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r["text"] for _, r in read_records(str(lines))] == ["a", "b"]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(SAMPLES["messages"][0]))
    assert read_records(str(single)) == [(f"{single}:1", SAMPLES["messages"][0])]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=rf"^{broken}:3: not valid JSON"):
        read_records(str(broken))
    scalars = tmp_path / "scalars.json"
    scalars.write_text('[{"text": "a"}, 5]')
    with pytest.raises(DataError, match=rf"^{scalars}:\[1\]: expected a JSON object"):
        read_records(str(scalars))


def test_csv_quotes_multiline_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"a, with comma",1\n"two\nlines",0\n\nlast,1\n')
    records = read_records(str(path))
    assert [o for o, _ in records] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    assert records[0][1] == {"text": "a, with comma", "label": "1"}
    assert records[1][1]["text"] == "two\nlines"


def test_csv_wrong_column_count(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nok,1\ntoo,many,values\n")
    with pytest.raises(DataError, match=rf"^{path}:3: 3 values but the header has 2 columns"):
        read_records(str(path))


def test_tsv_keeps_quotes_as_text(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text('sentence\tlabel\n"quoted" start \t1\nit \'s fine\t0\n')
    records = read_records(str(path))
    assert records[0] == (f"{path}:2", {"sentence": '"quoted" start ', "label": "1"})
    assert records[1][1]["sentence"] == "it 's fine"


def test_parquet_keeps_types(tmp_path: Path) -> None:
    path = write(tmp_path / "d.parquet", [{"text": "a", "label": 3}, {"text": "b", "label": 1}])
    assert read_records(str(path))[1] == (f"{path}:row 1", {"text": "b", "label": 1})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "d.xlsx"
    bad.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx'; use one of .json, .jsonl, .csv, .tsv, "
                                        r".parquet"):
        read_records(str(bad))
    with pytest.raises(DataError, match="is a folder"):
        read_records(str(tmp_path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"^{empty}: no examples"):
        read_records(str(empty))
    damaged = tmp_path / "d.parquet"
    damaged.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"^{damaged}: cannot read as parquet"):
        read_records(str(damaged))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed")
def test_hub_without_datasets_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"^hub:tatsu-lab/alpaca: reading hub data sets needs the `datasets`"):
        read_records("hub:tatsu-lab/alpaca")


# ---------------------------------------------------------------- errors in examples

BAD_RECORDS = [
    ({"instruction": "x"}, "alpaca", r"missing field 'output'"),
    ({"instruction": "x", "output": 5}, "alpaca", r"field 'output' must be a string, got int"),
    ({"instruction": "  ", "output": "y"}, "alpaca", r"field 'instruction' is empty"),
    ({"messages": []}, "messages", r"'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", r"messages\[0\]: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}, "messages",
     r"messages\[0\]: field 'content' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", r"no assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "messages", r"messages\[1\]: weight must be 0 or 1, got 0.5"),
    ({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
     "messages", r"messages\[0\]: weight is only allowed on assistant messages"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", r"conversations\[0\]: unknown speaker 'bot'"),
    ({"prompt": "p", "completion": None}, "prompt_completion", r"missing field 'completion'"),
    ({"text": "t", "label": [1]}, "classification", r"label must be an integer or a string"),
    ({"text": "t", "label": 0.5}, "classification", r"label must be an integer or a string"),
    ({"text": 3}, "text", r"field 'text' must be a string"),
]


@pytest.mark.parametrize(("record", "fmt", "message"), BAD_RECORDS)
def test_bad_examples_name_their_origin(record: dict[str, Any], fmt: str, message: str) -> None:
    with pytest.raises(DataError, match=rf"^data.jsonl:4: .*{message}"):
        to_examples([("data.jsonl:4", record)], fmt)


def test_auto_requires_one_format(tmp_path: Path) -> None:
    path = write(tmp_path / "mixed.jsonl", [SAMPLES["alpaca"][0], SAMPLES["alpaca"][1], {"text": "stray"}])
    with pytest.raises(DataError, match=rf"^{path}:3: missing field 'instruction'.*detected as alpaca from "
                                        rf"{path}:1"):
        load_examples(str(path))


def test_unknown_format_name() -> None:
    with pytest.raises(DataError, match=r"unknown data\.format 'chatml'"):
        to_examples([("x:1", {"text": "a"})], "chatml")


def test_max_examples(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", SAMPLES["text"] * 5)
    assert len(load_examples(str(path), max_examples=3)) == 3


# ---------------------------------------------------------------- the reference data

@needs_shared
def test_real_alpaca_demo() -> None:
    path = str(SHARED / "alpaca_en_demo.json")
    examples = load_examples(path)
    assert len(examples) == 999
    assert detect_format(read_records(path)[0][1], "x") == "alpaca"
    assert all(e.messages is not None and [m.role for m in e.messages] == ["user", "assistant"]
               for e in examples)
    assert examples[0].messages is not None
    assert examples[0].messages[0].content == "Describe a process of making crepes."
    records = [r for _, r in read_records(path)]
    with_input = [e for e, r in zip(examples, records, strict=True) if r["input"]]
    assert len(with_input) == 412
    assert all(e.messages and e.messages[0].content.endswith("\n\n" + r["input"])
               for e, r in zip(examples, records, strict=True) if r["input"])


@needs_shared
def test_real_sst2_dev() -> None:
    examples = load_examples(str(SHARED / "sst2_dev.tsv"))
    assert len(examples) == 872
    assert examples[0].origin.endswith("sst2_dev.tsv:2")
    assert examples[0].text == "it 's a charming and often affecting journey . "
    assert {e.label for e in examples} == {"0", "1"}
