"""A save killed with SIGKILL at a random moment never damages or hides the earlier checkpoint."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import jckpt
from jckpt import format as fmt

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jckpt

    root, start = sys.argv[1], int(sys.argv[2])
    for step in range(start, start + 1000):
        state = {"big": np.full((2048, 4096), step, np.float32),          # 32 MiB: saves long enough
                                                                          # for the kills to land in them
                 "many": [np.full(100, step + i) for i in range(50)],      # packed
                 "step": step}
        print("saving", step, flush=True)
        jckpt.save(root, state, step=step, options=jckpt.SaveOptions(chunk_bytes=2**20))
    """
)


def _check_every_committed_step(root):
    steps = jckpt.all_steps(root)
    for step in steps:
        state = jckpt.restore(root, step=step)
        assert state["step"] == step
        assert np.all(state["big"] == step)
        assert [int(x[0]) for x in state["many"]] == [step + i for i in range(50)]
        jckpt.verify(root, step=step)
    return steps


def _uncommitted_dirs(root):
    committed = {fmt.step_name(step) for step in jckpt.all_steps(root)}
    return [d for d in os.listdir(root) if d.startswith("step_") and d not in committed]


@pytest.mark.slow
def test_sigkill_during_save_never_loses_or_exposes_a_checkpoint(tmp_path):
    rng = random.Random(1234)
    root = str(tmp_path / "ckpt")
    killed_mid_save = 0
    for _ in range(10):
        start = (jckpt.latest_step(root) or 0) + 1
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, root, str(start)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(rng.randint(2, 4)):  # let a few saves commit first
            line = child.stdout.readline()
            assert line.startswith("saving"), line
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        killed_mid_save += bool(_uncommitted_dirs(root))
        steps = _check_every_committed_step(root)
        assert steps and steps[-1] >= start, "the first saves of each run must have committed"
    assert killed_mid_save >= 5, "the kills should mostly land inside a save"
    # the next save removes whatever the killed saves left
    jckpt.save(root, {"big": np.zeros(1), "many": [], "step": 0}, step=10**6)
    assert _uncommitted_dirs(root) == []
