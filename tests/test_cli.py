"""The jckpt command line, run as a user would (a real subprocess for one case)."""

import subprocess
import sys

import numpy as np

import jckpt
from jckpt import cli
from jckpt import format as fmt


def _root(tmp_path):
    for step in range(3):
        state = {"w": np.full((300, 300), step // 2, np.float32), "b": np.full(3, step)}
        jckpt.save(tmp_path, state, step=step, metrics={"loss": 1.0 / (step + 1)})
    return str(tmp_path)


def test_ls_info_verify(tmp_path, capsys):
    root = _root(tmp_path)
    assert cli.main(["ls", root]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]  # after the header and its rule
    assert [row.split()[:2] for row in rows] == [["0", "full"], ["1", "full"], ["2", "full"]]
    assert '"loss": 0.5' in rows[1]
    assert cli.main(["info", root, "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert "step 1" in out and "w" in out and "(300, 300)" in out.replace("[", "(").replace("]", ")")
    assert cli.main(["verify", root, "--all"]) == 0
    assert capsys.readouterr().out.splitlines() == ["step 0: ok", "step 1: ok", "step 2: ok"]


def test_diff_names_changed_leaves(tmp_path, capsys):
    root = _root(tmp_path)

    def changed(a, b):
        assert cli.main(["diff", root, a, b]) == 0
        return sorted(row.split()[0] for row in capsys.readouterr().out.splitlines()[2:])

    assert changed("0", "1") == ["b"]  # w is 0 in both
    assert changed("1", "2") == ["b", "w"]
    # small leaves share one packed chunk: only the one whose bytes changed is reported
    jckpt.save(root, {"w": np.full((300, 300), 1, np.float32), "b": np.full(3, 2), "c": np.ones(2)}, step=3)
    jckpt.save(root, {"w": np.full((300, 300), 1, np.float32), "b": np.full(3, 2), "c": np.zeros(2)}, step=4)
    assert changed("3", "4") == ["c"]
    assert changed("2", "3") == ["c"]  # only in step 3


def test_rm_and_gc(tmp_path, capsys):
    root = _root(tmp_path)
    assert cli.main(["rm", root, "0", "1"]) == 0
    assert jckpt.all_steps(root) == [2]
    (tmp_path / fmt.step_name(9) / "dleftover" / "x").mkdir(parents=True)
    (tmp_path / fmt.step_name(9) / "dleftover" / "x" / "c").write_bytes(b"junk")
    assert cli.main(["gc", root]) == 0
    assert "removed 1 uncommitted" in capsys.readouterr().out
    assert not (tmp_path / fmt.step_name(9)).exists()


def test_errors_exit_nonzero_with_a_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jckpt.cli", "verify", str(tmp_path), "--step", "4"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "CheckpointNotFoundError" in result.stderr
