"""The main example (examples/train.py + configs/digits.yaml), run as a user runs it,
and the code in README.md and docs/quickstart.md."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import jckpt

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train.py"
CONFIG = REPO / "configs" / "digits.yaml"

NEVER = "checkpoint.every_n_steps=1000000"  # only the final (or preemption) save


def command(directory: pathlib.Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-u", str(SCRIPT), "--config", str(CONFIG),
        "--set", f"checkpoint.directory={directory}", "train.log_every=50", *overrides,
    ]


def train(directory: pathlib.Path, *overrides: str) -> str:
    """Runs the example to completion; returns its stdout."""
    done = subprocess.run(
        command(directory, *overrides), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def leaves(directory: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """The checkpoint's leaves by key path, typed PRNG keys as their raw data."""
    state = jckpt.restore(directory, step=step)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(raw(leaf)) for path, leaf in flat}


def raw(leaf):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def assert_same_state(a: pathlib.Path, b: pathlib.Path, step: int) -> None:
    left, right = leaves(a, step), leaves(b, step)
    assert left.keys() == right.keys()
    assert any("params" in k for k in left) and any("opt_state" in k for k in left)
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)  # bitwise
    assert jckpt.info(a, step).metrics == jckpt.info(b, step).metrics


@pytest.mark.slow  # each run is a fresh Python process (~4 s)
def test_second_run_resumes_and_matches_an_uninterrupted_run(tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    policy = ("checkpoint.every_n_steps=50",)

    first = train(resumed, "train.steps=120", *policy)  # stops between two saves
    assert "starting from scratch" in first
    assert jckpt.all_steps(resumed) == [50, 100, 120]  # the final state is always saved

    second = train(resumed, "train.steps=250", *policy)
    assert "resumed from step 120" in second
    assert "step   150" in second and "step    50" not in second  # continued, not redone

    train(straight, "train.steps=250", *policy)
    assert_same_state(resumed, straight, 250)
    assert int(jckpt.restore(resumed, step=250)["step"]) == 250

    # The YAML's retention: keep_last 3 plus the 2 best by val_loss.
    kept = jckpt.all_steps(resumed)
    assert kept[-3:] == [150, 200, 250] and len(kept) <= 5
    losses = {s: jckpt.info(resumed, s).metrics["val_loss"] for s in kept}
    assert set(kept) >= set(sorted(losses, key=losses.get)[:2])

    third = train(resumed, "train.steps=250", *policy)  # nothing left to do
    assert "resumed from step 250" in third
    assert jckpt.all_steps(resumed) == kept


@pytest.mark.slow
def test_preempted_run_saves_and_stops_then_resumes(tmp_path):
    preempted, straight = tmp_path / "preempted", tmp_path / "straight"
    overrides = ("train.steps=100000", NEVER,
                 "checkpoint.handle_preemption=true")
    proc = subprocess.Popen(
        command(preempted, *overrides), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step    50"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    [stopped] = jckpt.all_steps(preempted)
    assert f"preempted: saved step {stopped}, stopping" in out
    assert 50 <= stopped < 100000

    # The preemption checkpoint is the state an uninterrupted run has at that step.
    train(straight, f"train.steps={stopped}", NEVER)
    assert_same_state(preempted, straight, stopped)

    resumed = train(preempted, f"train.steps={stopped + 10}", NEVER)
    assert f"resumed from step {stopped}" in resumed
    assert jckpt.latest_step(preempted) == stopped + 10


@pytest.mark.slow
def test_bad_config_key_fails_with_the_file_and_key(tmp_path):
    done = subprocess.run(
        command(tmp_path, "checkpoint.keep_lats=3"), cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 2
    assert "checkpoint.keep_lats" in done.stderr and "did you mean 'keep_last'" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md"])
def test_documented_python_runs(doc, tmp_path, monkeypatch):
    """Every ```python block of the page, in order, as one session."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / doc).read_text(), re.S)
    assert blocks
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{doc} block {i}", "exec", dont_inherit=True), namespace)


def test_readme_commands_are_the_ci_commands():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(commands) == 2  # set up + run the example; run the tests
    assert "examples/train.py --config configs/digits.yaml" in commands[0]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
    assert any(line.startswith("python3 -m pytest -m slow") for line in ci)  # as the README says
