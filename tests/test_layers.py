"""The layers of docs/architecture.md hold: import-linter checks the contract in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_imports_run_one_way_down_the_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    cli = pytest.importorskip("importlinter.cli")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the contract lives in pyproject.toml
    assert cli.lint_imports(no_cache=True, no_logo=True) == 0, "a module imports upwards: run `make lint`"


def test_the_contract_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A contract that cannot fail is no check: with the config schema put above the methods, the methods'
    (downward, allowed) imports of it become upward ones and are reported."""
    cli = pytest.importorskip("importlinter.cli")
    root = Path(__file__).resolve().parents[1]
    contract = (root / "pyproject.toml").read_text()
    contract = contract[contract.index("[tool.importlinter]"):]
    swapped = contract.replace('"methods | models | demo",', "@@").replace('"config | modules",',
                                                                           '"methods | models | demo",')
    config = tmp_path / "contract.toml"
    config.write_text(swapped.replace("@@", '"config | modules",'))
    monkeypatch.chdir(root)
    assert cli.lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 1
    assert "deltatune.methods" in capsys.readouterr().out
