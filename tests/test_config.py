"""The run schema: defaults, YAML, overrides, and error messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltatune.config import describe_keys, dump_config, load_config
from deltatune.errors import ConfigError


def test_defaults_and_precedence(tmp_path: Path) -> None:
    cfg = load_config()
    assert cfg.method.name == "lora" and cfg.method.r == 8 and cfg.train.lr is None
    run = tmp_path / "run.yaml"
    run.write_text("method:\n  r: 4\ntrain:\n  epochs: 3\n  lr: 1e-3\n")
    cfg = load_config(run, ["train.epochs=2", "method.targets=[q_proj, v_proj]", "data.eval=0.2"])
    assert (cfg.method.r, cfg.train.epochs, cfg.train.lr) == (4, 2.0, 1e-3)
    assert cfg.method.targets == ["q_proj", "v_proj"] and cfg.data.eval == 0.2


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["method.use_rslora=true", "data.eval=held.jsonl"])
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.rr=3"], "method.rr: unknown key"),
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["method.name=nope"], "unknown method 'nope'"),
        (["data.eval=0.9"], "data.eval: a fraction must be in (0, 0.5]"),
        (["data.truncation=cut"], "data.truncation"),
        (["modell.name=x"], "modell: unknown key"),
        (["train.epochs"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-3\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_every_key_is_documented() -> None:
    rows = describe_keys()
    keys = {k for k, _, _ in rows}
    for required in ("model.name", "data.train", "data.eval", "data.format", "data.max_length", "method.name",
                     "method.r", "method.alpha", "method.dropout", "method.targets", "train.epochs",
                     "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr", "train.schedule",
                     "train.warmup", "train.seed", "train.eval_every", "train.save_every", "output.dir"):
        assert required in keys
    assert all(help_text for _, _, help_text in rows)
