"""jckpt.config: the checkpoint section validates itself and maps to a policy and save options."""

from __future__ import annotations

import ast
import pathlib

import pytest

from jckpt import policy as P
from jckpt.config import CheckpointConfig, ConfigError, KeepBestConfig

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("make", "key", "fragment"),
    [
        (lambda: CheckpointConfig(every_n_steps=0), "every_n_steps", "must be >= 1"),
        (lambda: CheckpointConfig(keep_last=-1), "keep_last", "must be >= 1"),
        (lambda: CheckpointConfig(keep_every_n_steps=0), "keep_every_n_steps", "must be >= 1"),
        (lambda: CheckpointConfig(every_n_seconds=-1), "every_n_seconds", "must be > 0"),
        (lambda: CheckpointConfig(compression="lz4"), "compression", "zstd"),
        (lambda: CheckpointConfig(directory=""), "directory", "non-empty"),
        (lambda: CheckpointConfig(full_every=0), "full_every", "must be >= 1"),
        (lambda: KeepBestConfig(n=0), "n", "must be >= 1"),
        (lambda: KeepBestConfig(metric=""), "metric", "non-empty"),
        (lambda: KeepBestConfig(mode="maximal"), "mode", "'min' or 'max'"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_field(make, key, fragment):
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.key == key
    assert fragment in e.value.problem and str(e.value).startswith(f"{key}: ")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_the_library_does_not_import_yaml():
    # PyYAML is not a dependency of jckpt: only examples/ (and tests) read YAML.
    for path in sorted((REPO / "jckpt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "yaml" or n.startswith("yaml.") for n in names), path


# ------------------------------------------------------- config -> policy


def run(cfg: CheckpointConfig, steps: int, metrics=None) -> P.Simulation:
    events = [P.Event(s, float(s), metrics[s] if metrics else None) for s in range(steps)]
    return P.simulate(cfg.policy(), events)


def test_policy_every_n_steps_and_keep_last():
    sim = run(CheckpointConfig(every_n_steps=2, keep_last=2), 12)
    assert sim.saved == [0, 2, 4, 6, 8, 10]
    assert sim.kept == [8, 10]


def test_policy_keep_last_union_keep_every_n_steps():
    sim = run(CheckpointConfig(every_n_steps=2, keep_last=2, keep_every_n_steps=4), 12)
    assert sim.kept == [0, 4, 8, 10]


def test_policy_keep_best():
    losses = [5, 1, 4, 3, 6, 2]
    cfg = CheckpointConfig(every_n_steps=1, keep_best=KeepBestConfig("loss", "min", 2))
    assert run(cfg, 6, [{"loss": v} for v in losses]).kept == [1, 5]


def test_policy_without_rules_saves_every_call_and_keeps_everything():
    sim = run(CheckpointConfig(every_n_steps=None), 4)
    assert sim.saved == [0, 1, 2, 3] and sim.kept == [0, 1, 2, 3]


def test_policy_every_n_seconds():
    events = [P.Event(s, 1800.0 * s) for s in range(8)]
    cfg = CheckpointConfig(every_n_steps=None, every_n_seconds=3600)
    assert P.simulate(cfg.policy(), events).saved == [0, 2, 4, 6]


def test_policy_incremental_kinds():
    sim = run(CheckpointConfig(every_n_steps=1, incremental=True, full_every=3), 5)
    assert sim.kinds == ["full", "incremental", "incremental", "full", "incremental"]


def test_policy_is_full_only_unless_incremental():
    assert set(run(CheckpointConfig(every_n_steps=1), 4).kinds) == {"full"}


def test_save_options_carry_compression():
    assert CheckpointConfig(compression="zstd").save_options().compression == "zstd"
    assert CheckpointConfig().save_options().compression is None
