"""The jckpt command line, run as a user would (real subprocesses where the process matters)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import jckpt
from jckpt import cli
from jckpt import format as fmt
from jckpt import policy as P


def _root(tmp_path):
    for step in range(3):
        state = {"w": np.full((300, 300), step // 2, np.float32), "b": np.full(3, step)}
        jckpt.save(tmp_path, state, step=step, metrics={"loss": 1.0 / (step + 1)})
    return str(tmp_path)


def _run(*argv):
    return subprocess.run(["jckpt", *map(str, argv)], capture_output=True, text=True)


def test_ls_shows_sizes_dates_tags_and_metrics_to_4_digits(tmp_path, capsys):
    root = _root(tmp_path)
    jckpt.tag(root, 1, "best")
    assert cli.main(["ls", root]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()[2:5]  # after the header and its rule
    assert [row.split()[:2] for row in rows] == [["0", "full"], ["1", "full"], ["2", "full"]]
    assert "loss=0.3333" in rows[2] and "0.33333" not in rows[2]
    assert "best" in rows[1]
    assert time.strftime("%Y-%m-%d") in rows[0]  # a date, not epoch seconds
    assert "written: bytes this save wrote" in out  # written vs total explained


def test_ls_and_info_json_for_scripts(tmp_path, capsys):
    root = _root(tmp_path)
    assert cli.main(["ls", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [x["step"] for x in listed] == [0, 1, 2] and listed[1]["metrics"] == {"loss": 0.5}
    assert cli.main(["info", root, "--step", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 1 and {leaf["path"] for leaf in info["leaves"]} == {"w", "b"}
    assert info["lineage"]["versions"]["jckpt"]


def test_info_hides_the_managers_policy_state_unless_all(tmp_path, capsys):
    with jckpt.CheckpointManager(tmp_path, policy=P.every_n_steps(1), async_save=False) as mngr:
        mngr.maybe_save(0, {"w": np.ones(3)}, metadata={"run": "a"})
    assert cli.main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"run": "a"' in out and '"jckpt"' not in out and "lineage" not in out.split("metadata")[0]
    assert "versions" in out and "command" in out  # lineage shown
    assert cli.main(["info", str(tmp_path), "--all"]) == 0
    assert '"jckpt"' in capsys.readouterr().out


def test_verify_all(tmp_path, capsys):
    root = _root(tmp_path)
    assert cli.main(["verify", root, "--all"]) == 0
    assert capsys.readouterr().out.splitlines() == ["step 0: ok", "step 1: ok", "step 2: ok"]


def test_diff_reports_magnitudes_and_exits_1_when_steps_differ(tmp_path, capsys):
    root = _root(tmp_path)
    assert cli.main(["diff", root, "0", "0"]) == 0
    assert "identical" in capsys.readouterr().out
    assert cli.main(["diff", root, "2", "1"]) == 1
    rows = {row.split()[0]: row.split() for row in capsys.readouterr().out.splitlines()[2:] if row.strip()}
    assert rows["w"][1] == "changed" and rows["w"][-2:] == ["1", "1"]  # max|a-b| 1, rel L2 1 (1 -> 0)
    assert rows["b"][1] == "changed"
    jckpt.save(root, {"w": np.zeros((300, 300), np.float32), "c": np.ones(2)}, step=3)
    assert cli.main(["diff", root, "2", "3", "--json"]) == 1
    report = {d["path"]: d["status"] for d in json.loads(capsys.readouterr().out)}
    assert report == {"w": "changed", "b": "removed", "c": "added"}


def test_rm_and_gc_with_dry_runs(tmp_path, capsys):
    root = _root(tmp_path)
    assert cli.main(["rm", root, "0", "--dry-run"]) == 0
    assert "would delete steps [0]" in capsys.readouterr().out
    assert jckpt.all_steps(root) == [0, 1, 2]
    assert cli.main(["rm", root, "0", "1"]) == 0
    assert jckpt.all_steps(root) == [2]
    (tmp_path / fmt.step_name(9) / "dleftover" / "x").mkdir(parents=True)
    (tmp_path / fmt.step_name(9) / "dleftover" / "x" / "c").write_bytes(b"junk")
    assert cli.main(["gc", root, "--dry-run"]) == 0
    assert "would remove 1 uncommitted" in capsys.readouterr().out
    assert (tmp_path / fmt.step_name(9)).exists()
    assert cli.main(["gc", root]) == 0
    assert "removed 1 uncommitted" in capsys.readouterr().out
    assert not (tmp_path / fmt.step_name(9)).exists()


def test_tags_export_and_import_in_subprocesses(tmp_path):
    root = _root(tmp_path / "run")
    assert _run("tag", root, 1, "prod").stdout.strip() == "prod -> step 1"
    assert json.loads(_run("tags", root, "--json").stdout) == {"prod": 1}
    refused = _run("rm", root, 1)
    assert refused.returncode == 1 and "StepTaggedError" in refused.stderr
    assert _run("verify", root, "--step", "prod").stdout.strip() == "step 1: ok"
    out = tmp_path / "hf"
    exported = _run("export", root, out, "--step", "prod", "--max-shard-size", "200KB")
    assert exported.returncode == 0, exported.stderr
    assert (out / "model.safetensors.index.json").exists()
    from safetensors.numpy import load_file

    tensors = {}
    for shard in out.glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    np.testing.assert_array_equal(tensors["w"], np.zeros((300, 300), np.float32))
    imported = _run("import", out, tmp_path / "imported", "--step", 7)
    assert imported.returncode == 0, imported.stderr
    assert "imported from safetensors" in imported.stdout
    np.testing.assert_array_equal(jckpt.restore(tmp_path / "imported", step=7)["b"], np.full(3, 1))
    assert _run("untag", root, "prod").returncode == 0 and _run("rm", root, 1).returncode == 0


def test_help_is_fast_and_every_flag_has_help(tmp_path):
    started = time.perf_counter()
    result = _run("--help")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "export" in result.stdout
    assert "jax" not in subprocess.run(
        [sys.executable, "-c", "import sys, jckpt.cli; jckpt.cli.parser(); print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
    ).stdout.split("'")  # --help never imports jax
    print(f"jckpt --help took {elapsed:.2f} s")
    assert _run("--version").stdout.strip() == f"jckpt {jckpt.__version__}"
    for name, sub in cli.parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest not in ("help", "debug"):
                assert action.help, f"jckpt {name} {action.dest} has no help"


@pytest.mark.parametrize("argv", [["verify", "{root}", "--step", "4"], ["info", "{root}", "--step", "nope"]])
def test_errors_exit_1_with_one_line(tmp_path, argv):
    root = _root(tmp_path)
    result = _run(*(a.format(root=root) for a in argv))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "CheckpointNotFoundError" in result.stderr
