"""Host state with real processes: 2-process jax.distributed groups, and SIGKILL over a train loop
that draws from a Grain pipeline (exact resume: the same batch at every step, bitwise equal params)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_multihost import run

import jckpt
from jckpt.root import Root

pytestmark = pytest.mark.slow

TRAINER = Path(__file__).with_name("host_state_trainer.py")


def test_each_process_saves_and_restores_its_own_state(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    group = run("host_state", 2, tmp_path / "g2", dir=ckpt, mesh=[2, 2])
    assert group[0]["draws"] != group[1]["draws"]  # each process at its own position
    manifest = Root(ckpt).read_manifest(2)
    data = next(leaf for leaf in manifest.leaves if leaf.path == "loader")
    assert [s.process for s in data.states] == [0, 1]
    first = next(leaf for leaf in Root(ckpt).read_manifest(1).leaves if leaf.path == "loader")
    assert data.states[0] == first.states[0] and data.states[1] != first.states[1]  # process 0's reused
    assert data.states[1].blob.endswith("packed-p1")
    (one,) = run("host_state", 1, tmp_path / "g1", dir=ckpt)
    assert "'loader'" in one["error"] and "saved by 2 process" in one["error"] and "has 1" in one["error"]
    assert [s["next_index"] for s in one["mapped"]["loader"]] == [2, 6] and one["next_index"] == 6
    moved = [d.status for d in jckpt.diff(ckpt, 1, 2) if d.path in ("loader", "noise")]
    assert moved == ["changed", "changed"]
    jckpt.verify(ckpt)


def _trainer(root: Path, log: Path, steps: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, str(TRAINER), str(root), str(log), str(steps)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def _consumed(log: Path) -> list[tuple[int, list]]:
    """(step, batch) of every step the trainer ran, restarts included (a line cut by a kill is skipped)."""
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(tuple(json.loads(line)))
        except ValueError:
            pass
    return out


def test_sigkill_at_random_moments_resumes_the_exact_run(tmp_path):
    steps = 40
    reference = _trainer(tmp_path / "ref", tmp_path / "ref.log", steps)
    reference.communicate(timeout=600)
    assert reference.returncode == 0
    expected = dict(_consumed(tmp_path / "ref.log"))
    assert sorted(expected) == list(range(1, steps + 1))

    rng = random.Random(16)
    root, log = tmp_path / "ckpt", tmp_path / "run.log"
    kills = runs = 0
    while True:
        runs += 1
        child = _trainer(root, log, steps)
        if kills < 8:
            for _ in range(rng.randint(1, 6)):  # let it run a few steps (and saves), then kill it
                if not child.stdout.readline():
                    break
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                kills += 1
                continue
        child.communicate(timeout=600)
        assert child.returncode == 0
        break
    consumed = _consumed(log)
    assert {step for step, _ in consumed} == set(range(1, steps + 1))
    assert all(batch == expected[step] for step, batch in consumed)  # redone steps drew the same batches
    final = {name: np.load(tmp_path / f"{name}.log.final.npy") for name in ("ref", "run")}
    assert final["run"].tobytes() == final["ref"].tobytes()
    print(f"exact resume: {kills} kills over {runs} runs, {len(consumed)} batches compared "
          f"({len(consumed) - steps} redone after a kill), final params bitwise equal")  # fmt: skip
    assert kills >= 5 and len(consumed) > steps
