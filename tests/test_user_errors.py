"""Every fault a user can make with a file or a setting ends in ONE line, never a traceback.

The table below is the documentation: each case id names a fault, its builder makes that fault in a fresh
folder and returns the `deltatune` command that meets it and the text (a path or a key) the message must
name. Each runs through the real CLI entry and must exit with code 2 and print one line (two at most)
starting ``deltatune: `` on stderr, with no ``Traceback`` and no torch advice about ``weights_only=False``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import deltatune.data.sources as sources
import deltatune.delta  # imported before timing: the quick cases time the checks, not the imports
import deltatune.training.loop  # noqa: F401
from deltatune.cli import main
from deltatune.config import ModelConfig
from deltatune.data import read_records
from deltatune.errors import DataError
from deltatune.models import load_model

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_file_modes = pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode; the setpriv test and "
                                                      "test_unreadable_data_file_is_one_line cover it")
QUICK_SECONDS = 10.0  # a case marked quick must fail this fast: no model load (20 s+), no network retries

CHAT = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                      {"role": "assistant", "content": str(i + 1)}]} for i in range(8)]
CHAT_JSONL = "".join(json.dumps(row) + "\n" for row in CHAT)


def write(path: Path, content: str | bytes) -> Path:
    """Write text or bytes to ``path`` and return it."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_delta(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real delta folder: one LoRA step on the tiny Llama, trained once for the whole module from a
    JSON-lines file that starts with a UTF-8 byte-order mark (which must be accepted)."""
    root = tmp_path_factory.mktemp("delta")
    data = write(root / "bom.jsonl", "\ufeff" + CHAT_JSONL)
    out = root / "run"
    code = main(["train", f"model.name={tiny_llama_dir}", f"data.train={data}", f"output.dir={out}",
                 "train.max_steps=1", "train.batch_size=4", "method.r=4", "--no-progress"])
    assert code == 0 and (out / "adapter_model.safetensors").is_file()
    return out


@dataclass
class Setup:
    """What a case builds its fault from: a fresh folder, the tiny model, and (on request) a good delta."""

    tmp: Path
    model: Path
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch

    def data(self, name: str, content: str | bytes) -> Path:
        """A data file in the case's folder."""
        return write(self.tmp / name, content)

    def train(self, *overrides: str, data: Path | None = None) -> list[str]:
        """`deltatune train` on the tiny model (good chat data unless ``data``), then ``overrides``."""
        data = data or self.data("chat.jsonl", CHAT_JSONL)
        return ["train", f"model.name={self.model}", f"data.train={data}", f"output.dir={self.tmp / 'run'}",
                "train.max_steps=1", "--no-progress", *overrides]

    def delta(self) -> Path:
        """A private copy of the module's trained delta, free to damage."""
        copy = self.tmp / "delta"
        shutil.copytree(self.request.getfixturevalue("trained_delta"), copy)
        return copy

    def model_copy(self, *, weights: bool = False) -> Path:
        """A copy of the tiny model folder: config and tokenizer, and the weights only if asked."""
        copy = self.tmp / "model"
        shutil.copytree(self.model, copy, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
        return copy


Builder = Callable[[Setup], tuple[list[str], str]]  # the command, and the text its message must contain


# ---- data files: read and checked before any model is loaded ---------------------------------------

def empty_data_file(s: Setup) -> tuple[list[str], str]:
    data = s.data("empty.jsonl", "")
    return s.train(data=data), str(data)


def invalid_utf8_data_file(s: Setup) -> tuple[list[str], str]:
    data = s.data("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))
    return s.train(data=data), str(data)


def invalid_json_line(s: Setup) -> tuple[list[str], str]:
    data = s.data("broken.jsonl", CHAT_JSONL + '{"text": "no closing brace"\n')
    return s.train(data=data), f"{data}:9"


def ragged_csv_row(s: Setup) -> tuple[list[str], str]:
    data = s.data("ragged.csv", "prompt,completion\nThe sky is, blue\nGrass is,green,and wet\n")
    return s.train(data=data), f"{data}:3"


def unknown_chat_role(s: Setup) -> tuple[list[str], str]:
    row = {"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    data = s.data("role.jsonl", json.dumps(row) + "\n")
    return s.train(data=data), f"{data}:1"


def message_weight_2(s: Setup) -> tuple[list[str], str]:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 2}]}
    data = s.data("weight.jsonl", json.dumps(row) + "\n")
    return s.train(data=data), f"{data}:1"


def unreadable_jsonl_file(s: Setup) -> tuple[list[str], str]:
    data = s.data("locked.jsonl", CHAT_JSONL)
    data.chmod(0)
    return s.train(data=data), f"{data}: cannot read (permission denied)"


def unreadable_csv_file(s: Setup) -> tuple[list[str], str]:
    data = s.data("locked.csv", "prompt,completion\nThe sky is, blue\n")
    data.chmod(0)
    return s.train(data=data), f"{data}: cannot read (permission denied)"


# ---- config files and overrides ----------------------------------------------------------------------

def bad_yaml_config(s: Setup) -> tuple[list[str], str]:
    config = s.data("run.yaml", "method:\n  r: [1, 2\n")
    return ["train", str(config)], str(config)


def unknown_config_key_override(s: Setup) -> tuple[list[str], str]:
    return s.train("method.rr=3"), "method.rr"


# ---- base models ---------------------------------------------------------------------------------------

def relative_model_path_without_dot_slash(s: Setup) -> tuple[list[str], str]:
    (s.tmp / "models").mkdir()
    s.monkeypatch.chdir(s.tmp)  # `models/x`: its first part is a folder here, so it is a path, not a hub id
    return s.train("model.name=models/x"), "models/x: no such folder"


def _no_hub(s: Setup, **env: str) -> None:
    s.monkeypatch.setenv("HF_HOME", str(s.tmp / "hf-home"))  # an empty Hugging Face cache
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        s.monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        s.monkeypatch.setenv(var, value)


def hub_id_with_the_hub_unreachable(s: Setup) -> tuple[list[str], str]:
    _no_hub(s, HF_ENDPOINT="http://127.0.0.1:9")  # the discard port: nothing listens there
    return s.train("model.name=no-such-org/no-such-model"), "no-such-org/no-such-model"


def hub_id_not_cached_and_offline(s: Setup) -> tuple[list[str], str]:
    _no_hub(s, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    return s.train("model.name=no-such-org/no-such-model"), "HF_HUB_OFFLINE is set"


def not_a_gguf_file(s: Setup) -> tuple[list[str], str]:
    gguf = s.data("x.gguf", bytes(range(256)) * 16)
    return s.train(f"model.name={gguf}"), f"{gguf}: not a GGUF file (bad magic bytes"


def empty_gguf_file(s: Setup) -> tuple[list[str], str]:
    gguf = s.data("empty.gguf", b"")
    return s.train(f"model.name={gguf}"), f"{gguf}: not a GGUF file"


def truncated_gguf_file(s: Setup) -> tuple[list[str], str]:
    s.monkeypatch.setenv("DELTATUNE_CACHE", str(s.tmp / "cache"))
    gguf = s.data("cut.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)  # a header cut short
    return s.train(f"model.name={gguf}"), f"{gguf}: cannot read the GGUF model"


class Unpicklable:
    """Anything but a tensor: torch's safe loader refuses to unpickle it."""


def pickled_base_model_weights(s: Setup) -> tuple[list[str], str]:
    model = s.model_copy()
    torch.save({"model.embed_tokens.weight": Unpicklable()}, model / "pytorch_model.bin")
    return s.train(f"model.name={model}"), f"cannot load '{model}'"


def damaged_base_model_weights(s: Setup) -> tuple[list[str], str]:
    model = s.model_copy(weights=True)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return s.train(f"model.name={model}"), f"cannot load '{model}'"


# ---- delta folders (generate, eval, chat, merge read them) ---------------------------------------------

def truncated_delta_weights(s: Setup) -> tuple[list[str], str]:
    delta = s.delta()
    weights = delta / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["generate", str(delta), "hi"], f"{weights}: not a readable safetensors file"


def empty_delta_weights(s: Setup) -> tuple[list[str], str]:
    delta = s.delta()
    write(delta / "adapter_model.safetensors", b"")
    data = s.data("eval.jsonl", CHAT_JSONL)
    return ["eval", str(delta), "--data", str(data)], f"{delta / 'adapter_model.safetensors'}: not a readable"


def delta_weights_missing_tensors(s: Setup) -> tuple[list[str], str]:
    delta = s.delta()
    weights = delta / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata, names = f.metadata(), sorted(f.keys())
        tensors = {name: f.get_tensor(name) for name in names[1:]}
    save_file(tensors, str(weights), metadata=metadata)
    return ["generate", str(delta), "hi"], names[0]


def adapter_config_not_an_object(s: Setup) -> tuple[list[str], str]:
    delta = s.delta()
    write(delta / "adapter_config.json", "[1, 2]\n")
    return ["generate", str(delta), "hi"], f"{delta / 'adapter_config.json'}: expected a JSON object"


def peft_lora_config_without_r(s: Setup) -> tuple[list[str], str]:
    delta = s.delta()  # made a plain peft delta: no deltatune metadata, so the peft fields decide
    weights = delta / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = json.loads((delta / "adapter_config.json").read_text())
    del config["r"]
    write(delta / "adapter_config.json", json.dumps(config))
    return ["generate", str(delta), "hi"], f"{delta / 'adapter_config.json'}: required key 'r' is missing"


# ---- output folders and checkpoints ---------------------------------------------------------------------

def output_dir_names_an_existing_file(s: Setup) -> tuple[list[str], str]:
    existing = s.data("notes.txt", "mine")
    return s.train(f"output.dir={existing}"), f"output.dir: {existing} is a file, not a folder"


def output_dir_under_a_read_only_parent(s: Setup) -> tuple[list[str], str]:
    # /sys is read-only even for root (file modes cannot make a read-only place for root)
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    return s.train("output.dir=/sys/deltatune-run/out"), "output.dir: cannot create or write /sys/deltatune-run/out"


def output_dir_inside_a_read_only_folder(s: Setup) -> tuple[list[str], str]:
    folder = s.tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return s.train(f"output.dir={folder / 'run'}"), f"output.dir: cannot create or write {folder / 'run'}"


def merge_onto_an_existing_file(s: Setup) -> tuple[list[str], str]:
    existing = s.data("merged", "mine")
    return ["merge", str(s.delta()), str(existing)], f"{existing} is a file, not a folder"


def merge_into_a_non_empty_folder(s: Setup) -> tuple[list[str], str]:
    folder = s.tmp / "merged"
    folder.mkdir()
    write(folder / "keep.txt", "mine")
    return ["merge", str(s.delta()), str(folder)], f"{folder} exists and is not empty"


class Planted:
    """A hostile object: unpickling it would call print."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("never",))


def pickle_planted_in_a_checkpoint(s: Setup) -> tuple[list[str], str]:
    argv = s.train("data.eval=null")
    assert main(argv) == 0
    ckpt = next((s.tmp / "run" / "checkpoints").iterdir())
    torch.save({"optimizer": Planted()}, ckpt / "optimizer.pt")
    (ckpt / "manifest.json").unlink()  # as a checkpoint of an earlier version: nothing to check it against
    return [*argv, "--resume"], f"{ckpt / 'optimizer.pt'}: holds objects other than tensors"


def case(builder: Builder, *marks: pytest.MarkDecorator, quick: bool = False) -> Any:
    """A table row; its id is the builder's name with dashes."""
    return pytest.param(builder, quick, id=builder.__name__.replace("_", "-"), marks=marks)


CASES = [
    case(empty_data_file, quick=True),
    case(invalid_utf8_data_file, quick=True),
    case(invalid_json_line, quick=True),
    case(ragged_csv_row, quick=True),
    case(unknown_chat_role, quick=True),
    case(message_weight_2, quick=True),
    case(unreadable_jsonl_file, needs_file_modes, quick=True),
    case(unreadable_csv_file, needs_file_modes, quick=True),
    case(bad_yaml_config, quick=True),
    case(unknown_config_key_override, quick=True),
    case(relative_model_path_without_dot_slash, quick=True),
    case(hub_id_with_the_hub_unreachable, quick=True),
    case(hub_id_not_cached_and_offline, quick=True),
    case(not_a_gguf_file, quick=True),
    case(empty_gguf_file, quick=True),
    case(truncated_gguf_file),
    case(pickled_base_model_weights),
    case(damaged_base_model_weights),
    case(truncated_delta_weights),
    case(empty_delta_weights),
    case(delta_weights_missing_tensors),
    case(adapter_config_not_an_object),
    case(peft_lora_config_without_r),
    case(output_dir_names_an_existing_file, quick=True),
    case(output_dir_under_a_read_only_parent, quick=True),
    case(output_dir_inside_a_read_only_folder, needs_file_modes, quick=True),
    case(merge_onto_an_existing_file, quick=True),
    case(merge_into_a_non_empty_folder, quick=True),
    case(pickle_planted_in_a_checkpoint),
]


@pytest.mark.parametrize(("builder", "quick"), CASES)
def test_a_user_fault_is_one_line_and_exit_2(builder: Builder, quick: bool, tiny_llama_dir: Path, tmp_path: Path,
                                             request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    argv, named = builder(Setup(tmp_path, tiny_llama_dir, request, monkeypatch))
    capsys.readouterr()  # what building printed (the fixture's training) is not the case's output
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert 1 <= len(lines) <= 2 and lines[0].startswith("deltatune: "), err
    assert named in err, err
    assert "Traceback" not in err and "weights_only" not in err, err
    if quick:
        assert seconds < QUICK_SECONDS, f"{seconds:.1f} s: {err}"


# ---- what is not an error, and the unreadable-file path where file modes cannot make one ------------

def test_a_utf8_bom_is_accepted(trained_delta: Path, tmp_path: Path) -> None:
    # the module's delta was trained from a JSON-lines file that starts with a BOM: the CLI accepted it
    assert (trained_delta / "adapter_model.safetensors").is_file()
    jsonl = write(tmp_path / "bom.jsonl", "\ufeff" + CHAT_JSONL)
    csv_file = write(tmp_path / "bom.csv", "\ufeffprompt,completion\nThe sky is, blue\n")
    assert read_records(str(jsonl))[0][1] == CHAT[0]
    assert read_records(str(csv_file)) == [(f"{csv_file}:2", {"prompt": "The sky is", "completion": " blue"})]


class _LockedPath(type(Path())):  # type: ignore[misc]
    """A path the system refuses to open, as a file without read permission is refused (not for root)."""

    def open(self, *args: object, **kwargs: object):  # type: ignore[override]
        raise PermissionError(13, "Permission denied", str(self))

    def read_text(self, *args: object, **kwargs: object) -> str:  # type: ignore[override]
        return self.open()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_unreadable_data_file_is_one_line(suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write(tmp_path / f"locked{suffix}", "prompt,completion\na,b\n")
    monkeypatch.setattr(sources, "Path", _LockedPath)
    with pytest.raises(DataError) as info:
        read_records(str(data))
    assert str(info.value).startswith(f"{data}: cannot read (permission denied); ")
    assert "\n" not in str(info.value)


NOBODY = 65534


def _as_nobody(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python argv...`` as user nobody (root can drop to it; nobody is refused a file of mode 000)."""
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, *argv]
    return subprocess.run(command, cwd=cwd, env={**os.environ, "HOME": str(cwd)}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None, reason="needs root and setpriv (util-linux)")
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_unreadable_data_file_through_the_cli_as_another_user(suffix: str) -> None:
    # the table skips its permission cases under root; here root drops to nobody, whom file modes do stop
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        root.chmod(0o755)
        if _as_nobody("-c", "import deltatune.cli", cwd=root).returncode != 0:
            pytest.skip("user nobody cannot run this Python or import deltatune")
        data = write(root / f"locked{suffix}", CHAT_JSONL if suffix == ".jsonl" else "prompt,completion\na,b\n")
        data.chmod(0)
        done = _as_nobody("-m", "deltatune", "train", f"data.train={data}", f"output.dir={root / 'run'}",
                          "--no-progress", cwd=root)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"deltatune: {data}: cannot read (permission denied); ")


@pytest.mark.parametrize("reader", [sources._read_jsonl, sources._read_csv])
def test_a_data_path_that_cannot_be_opened_is_one_line(reader: Callable[[Path], object], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r": cannot read \(is a directory\); "):
        reader(tmp_path)  # read_records stops a folder earlier; the readers still name any OSError


def test_a_cached_hub_model_loads_without_the_network(tiny_llama_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "hf-home" / "hub" / "models--some-org--tiny"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    write(repo / "refs" / "main", "0123abcd")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any request would fail (after retries)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    started = time.perf_counter()
    loaded = load_model(ModelConfig(name="some-org/tiny", device="cpu"))
    assert loaded.source == "some-org/tiny" and loaded.task == "causal_lm"
    assert time.perf_counter() - started < 15.0  # a single network retry would take longer
