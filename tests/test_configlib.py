"""examples/configlib.py: YAML -> dataclasses, command-line overrides, errors that name file and key.

The loader is the examples' (jckpt does not depend on PyYAML); these tests
load jckpt.config.CheckpointConfig with it, as examples/train.py does.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import pytest
import yaml

from jckpt.config import CheckpointConfig, KeepBestConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from configlib import (  # noqa: E402  (examples/ is not a package)
    ConfigError,
    from_dict,
    load,
    parse_args,
    to_dict,
    to_yaml,
)


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int = 10
    learning_rate: float = 1e-3
    name: str = "run"
    hidden: tuple[int, ...] = (32,)


@dataclasses.dataclass(frozen=True)
class Experiment:
    train: Train = Train()
    checkpoint: CheckpointConfig = CheckpointConfig()


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ loading


def test_defaults_without_a_file():
    assert load(Experiment) == Experiment()


def test_documented_default_file_equals_the_dataclass_defaults():
    assert load(Experiment, REPO / "configs" / "checkpoint.yaml") == Experiment()


def test_digits_checkpoint_section_loads():
    data = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    cfg = from_dict(CheckpointConfig, data["checkpoint"], source="digits.yaml")
    assert cfg.every_n_steps == 100 and cfg.keep_last == 3
    assert cfg.keep_best == KeepBestConfig("val_loss", "min", 2)


def test_yaml_values_and_nested_sections(tmp_path):
    path = write(
        tmp_path,
        "train: {steps: 7, learning_rate: 0.5, hidden: [8, 4]}\n"
        "checkpoint:\n  directory: /tmp/x\n  keep_last: 2\n"
        "  keep_best: {metric: acc, mode: max}\n",
    )
    cfg = load(Experiment, path)
    assert cfg.train == Train(steps=7, learning_rate=0.5, hidden=(8, 4))
    assert cfg.checkpoint.directory == "/tmp/x"
    assert cfg.checkpoint.keep_last == 2
    assert cfg.checkpoint.keep_best == KeepBestConfig(metric="acc", mode="max", n=1)
    assert cfg.checkpoint.every_n_steps == 1000  # untouched keys keep their defaults


def test_empty_file_gives_defaults(tmp_path):
    assert load(Experiment, write(tmp_path, "")) == Experiment()


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("learning_rate: 1e-3", "learning_rate", 1e-3),  # YAML 1.1 reads 1e-3 as a string
        ("learning_rate: 2", "learning_rate", 2.0),  # int -> float
        ("steps: 5.0", "steps", 5),  # integral float -> int
    ],
)
def test_lossless_number_conversions(tmp_path, text, field, expected):
    value = getattr(load(Experiment, write(tmp_path, f"train: {{{text}}}")).train, field)
    assert value == expected and type(value) is type(expected)


def test_round_trip_through_yaml(tmp_path):
    cfg = Experiment(
        Train(steps=3, hidden=(1, 2)),
        CheckpointConfig(keep_best=KeepBestConfig("acc", "max", 3), compression="zstd"),
    )
    assert load(Experiment, write(tmp_path, to_yaml(cfg))) == cfg
    assert to_dict(cfg)["train"]["hidden"] == [1, 2]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("checkpoint: {every_n_step: 5}", "checkpoint.every_n_step", "did you mean 'every_n_steps'"),
        ("train: {steps: many}", "train.steps", "expected an integer"),
        ("train: {steps: 1.5}", "train.steps", "expected an integer"),
        ("train: {steps: true}", "train.steps", "expected an integer"),
        ("train: {learning_rate: fast}", "train.learning_rate", "expected a number"),
        ("train: {name: 3}", "train.name", "expected a string"),
        ("train: {hidden: 3}", "train.hidden", "expected a list"),
        ("train: {hidden: [1, x]}", "train.hidden[1]", "expected an integer"),
        ("train: 5", "train", "expected a mapping"),
        ("checkpoint: {async_save: 1}", "checkpoint.async_save", "expected true or false"),
        ("checkpoint: {every_n_steps: 0}", "checkpoint.every_n_steps", "must be >= 1"),
        ("checkpoint: {every_n_seconds: -1}", "checkpoint.every_n_seconds", "must be > 0"),
        ("checkpoint: {compression: lz4}", "checkpoint.compression", "zstd"),
        ("checkpoint: {directory: ''}", "checkpoint.directory", "non-empty"),
        ("checkpoint: {full_every: 0}", "checkpoint.full_every", "must be >= 1"),
        ("checkpoint: {keep_best: {mode: maximal}}", "checkpoint.keep_best.mode", "'min', 'max'"),
        ("checkpoint: {keep_best: {n: 0}}", "checkpoint.keep_best.n", "must be >= 1"),
        ("checkpoint: {keep_best: {metrc: x}}", "checkpoint.keep_best.metrc", "'metric'"),
        ("checkpoint: {directory: null}", "checkpoint.directory", "must not be null"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(Experiment, path)
    assert e.value.source == str(path)
    assert e.value.key == key
    assert fragment in str(e.value)
    assert str(path) in str(e.value) and key in str(e.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "train: {steps: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        load(Experiment, path)
    assert str(path) in str(e.value)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load(Experiment, write(tmp_path, "- 1\n- 2\n"))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(Experiment, tmp_path / "nope.yaml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# -------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("train.steps=50", lambda c: c.train.steps == 50),
        ("train.learning_rate=1e-2", lambda c: c.train.learning_rate == 0.01),
        ("train.hidden=[16, 8]", lambda c: c.train.hidden == (16, 8)),
        ("train.name=2024", lambda c: c.train.name == "2024"),  # strings stay verbatim
        ("train.name=a=b", lambda c: c.train.name == "a=b"),  # only the first = splits
        ("checkpoint.every_n_steps=null", lambda c: c.checkpoint.every_n_steps is None),
        ("checkpoint.async_save=false", lambda c: c.checkpoint.async_save is False),
        ("checkpoint.compression=null", lambda c: c.checkpoint.compression is None),
        ("checkpoint.every_n_seconds=60", lambda c: c.checkpoint.every_n_seconds == 60.0),
        # A nested section that is null gets created with its defaults.
        ("checkpoint.keep_best.n=3", lambda c: c.checkpoint.keep_best == KeepBestConfig(n=3)),
        (
            "checkpoint.keep_best={metric: acc, mode: max}",
            lambda c: c.checkpoint.keep_best == KeepBestConfig("acc", "max"),
        ),
    ],
)
def test_override(override, check):
    assert check(load(Experiment, None, [override]))


def test_overrides_apply_after_the_file_in_order(tmp_path):
    path = write(tmp_path, "train: {steps: 7, name: file}\ncheckpoint: {keep_last: 2}")
    cfg = load(Experiment, path, ["train.steps=8", "train.steps=9", "checkpoint.keep_last=null"])
    assert (cfg.train.steps, cfg.train.name, cfg.checkpoint.keep_last) == (9, "file", None)


def test_override_can_disable_a_section(tmp_path):
    path = write(tmp_path, "checkpoint: {keep_best: {metric: acc}}")
    assert load(Experiment, path, ["checkpoint.keep_best=null"]).checkpoint.keep_best is None


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("train.step=5", "train.step", "did you mean 'steps'"),
        ("trian.steps=5", "trian", "did you mean 'train'"),
        ("train.steps=abc", "train.steps", "expected an integer"),
        ("train.steps.x=1", "train.steps.x", "not a section"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last", "must be >= 1"),
        ("train.hidden=[1,", "train.hidden", "cannot parse"),
    ],
)
def test_bad_override_names_the_override_and_key(tmp_path, override, key, fragment):
    path = write(tmp_path, "train: {steps: 7}")
    with pytest.raises(ConfigError) as e:
        load(Experiment, path, [override])
    assert e.value.source == f"override {override!r}"
    assert e.value.key == key
    assert fragment in str(e.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load(Experiment, None, ["train.steps"])


# ------------------------------------------------------------ command line


def test_parse_args_reads_config_set_and_bare_overrides(tmp_path):
    path = write(tmp_path, "train: {steps: 7, name: file}")
    cfg = parse_args(
        Experiment,
        ["--config", str(path), "--set", "train.steps=8", "checkpoint.keep_last=4",
         "--set", "train.learning_rate=0.5", "train.name=cli"],
    )
    assert cfg.train == Train(steps=8, learning_rate=0.5, name="cli")
    assert cfg.checkpoint.keep_last == 4


def test_parse_args_bad_key_exits_with_usage_error(tmp_path, capsys):
    path = write(tmp_path, "train: {stpes: 7}")
    with pytest.raises(SystemExit) as e:
        parse_args(Experiment, ["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "train.stpes" in err and "did you mean 'steps'" in err


def test_parse_args_print_config(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Experiment, ["--print-config", "train.steps=3"])
    assert e.value.code == 0
    assert from_dict(Experiment, yaml.safe_load(capsys.readouterr().out)).train.steps == 3
