"""The `deltatune` command: help for every command, config printing, errors as exit code 2."""

from __future__ import annotations

import pytest
import yaml

from deltatune.cli import build_parser, main

COMMANDS = ["train", "config", "generate", "chat", "eval", "merge", "compare", "export", "serve", "hosted"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: deltatune " + command in capsys.readouterr().out


def test_train_help_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("model.name", "data.truncation", "method.use_rslora", "train.grad_accum", "output.dir"):
        assert key in out


def test_config_prints_valid_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "method.r=32"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["method"]["r"] == 32 and set(tree) == {"model", "data", "method", "train", "output"}


def test_user_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "train.epochz=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "train.epochz: unknown key" in err[0]
    assert main(["generate", "/no/such/delta", "hi"]) == 2
    assert "adapter_config.json: not found" in capsys.readouterr().err


def test_every_command_has_a_parser() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
