"""The CLI on bad input (issue 9 defect 7): a non-zero exit and one line on stderr, never a traceback
(``--debug`` shows it); a missing path, a file or a non-checkpoint directory is an error, never an
empty table."""

import numpy as np
import pytest
from advutil import cli, marker_file, one_line_error, run_cli

import jckpt

COMMANDS = [["ls"], ["info"], ["info", "--step", "0"], ["verify"], ["verify", "--all"], ["diff", "0", "1"]]
COMMANDS += [["rm", "0"], ["gc"]]


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    for step in range(2):
        jckpt.save(root, {"w": np.full(1000, step, np.float32), "b": step}, step=step)
    return root


def _args(command, root):
    return [command[0], root, *command[1:]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_refuses_a_missing_path(tmp_path, command):
    line = one_line_error(cli(*_args(command, tmp_path / "missing")))
    assert "missing" in line and "no such" in line


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_refuses_a_file(tmp_path, command):
    path = tmp_path / "file"
    path.write_bytes(b"precious")
    line = one_line_error(cli(*_args(command, path)))
    assert "file" in line
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_refuses_a_directory_that_is_not_a_checkpoint_root(tmp_path, command):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    line = one_line_error(cli(*_args(command, tmp_path / "other")))
    assert "not a jckpt checkpoint root" in line
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_ls_of_an_empty_directory_is_an_error(tmp_path):
    one_line_error(cli("ls", tmp_path))


def test_verify_all_without_the_root_marker_is_an_error(root):
    marker_file(root).unlink()
    assert "jckpt.json" in one_line_error(cli("verify", root, "--all"))
    one_line_error(cli("ls", root))


def test_ls_of_a_root_whose_steps_were_all_deleted_is_an_empty_table(root):
    assert cli("rm", root, "0", "1").returncode == 0
    result = cli("ls", root)
    assert result.returncode == 0 and result.stderr == ""
    assert len(result.stdout.strip().splitlines()) <= 2  # the header (and its rule) only


def test_rm_of_a_step_that_is_not_committed_names_it(root):
    assert "7" in one_line_error(cli("rm", root, "7"))
    assert jckpt.all_steps(root) == [0, 1]


def test_verify_all_reports_every_bad_step_and_fails(root):
    jckpt.save(root, {"w": np.full(1000, 2, np.float32), "b": 2}, step=2)
    chunk = next(
        p for p in root.rglob("*") if p.is_file() and p.suffix != ".json" and "step_00000001" in str(p)
    )
    data = bytearray(chunk.read_bytes())
    data[0] ^= 1
    chunk.write_bytes(bytes(data))
    result = cli("verify", root, "--all")
    one_line_error(result)
    lines = result.stdout.splitlines()
    assert lines[0] == "step 0: ok" and lines[1].startswith("step 1: FAILED") and lines[2] == "step 2: ok"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["ls"],
        ["rm", "ROOT"],
        ["rm", "ROOT", "1.5"],
        ["rm", "ROOT", "-3"],
        ["rm", "ROOT", "three"],
        ["info", "ROOT", "--step", "1.5"],
        ["verify", "ROOT", "--step", "0", "--all"],
        ["diff", "ROOT", "0"],
    ],
    ids=repr,
)
def test_usage_errors_exit_2_with_one_line(root, argv):
    argv = [root if a == "ROOT" else a for a in argv]
    one_line_error(cli(*argv), code=2)
    assert jckpt.all_steps(root) == [0, 1]


def test_help_still_works():
    result = cli("--help")
    assert result.returncode == 0 and "verify" in result.stdout


def test_debug_prints_the_traceback_in_process(tmp_path):
    for argv in (["--debug", "ls", tmp_path / "missing"], ["ls", tmp_path / "missing", "--debug"]):
        result = cli(*argv)
        assert result.returncode == 1
        assert "Traceback" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("jckpt ls: ")


# A few real processes: what only a process shows (exit status of the interpreter, nothing else printed).


def test_a_real_process_exits_1_with_one_line(tmp_path):
    line = one_line_error(run_cli("verify", tmp_path / "missing", "--all"))
    assert line.startswith("jckpt verify: ") and "missing" in line


def test_a_real_process_with_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "gc", tmp_path / "missing")
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
