"""Symlink and path attacks (issue 9 defects 1 and 7): deletion never follows a symlink out of the
root; hostile key names round-trip or are refused, and never write outside the root; a copied
step directory is not taken for another step."""

import os
import re
import shutil

import numpy as np
import pytest
from advutil import OPTIONS, cli, data_dirs_of, expected_state, fingerprint, manifest_files, state_problem

import jckpt

ATTACKS = "symlink attacks: outside data survives"



@pytest.fixture
def setup(tmp_path):
    """(root with steps 0 full and 1 incremental, an outside directory full of precious files)."""
    root = tmp_path / "root"
    for step in (0, 1):
        jckpt.save(
            root, expected_state(step), step=step, kind="incremental", options=jckpt.SaveOptions(**OPTIONS)
        )
    outside = tmp_path / "outside"
    (outside / "sub" / "c").mkdir(parents=True)
    (outside / "precious.txt").write_text("do not delete")
    (outside / "sub" / "zarr.json").write_text("{}")
    (outside / "sub" / "c" / "0").write_bytes(b"\x01" * 100)
    return root, outside


def _mutate(root, step):
    """Every mutating operation a user runs: save, incremental save, gc, rm, delete."""
    errors = []
    operations = [
        (
            "save",
            lambda: jckpt.save(root, expected_state(step), step=step, options=jckpt.SaveOptions(**OPTIONS)),
        ),
        (
            "incremental save",
            lambda: jckpt.save(root, expected_state(step + 1), step=step + 1, kind="incremental"),
        ),
        ("jckpt gc", lambda: _cli_ok("gc", root)),
        ("delete", lambda: jckpt.delete(root, step)),
        ("jckpt rm", lambda: _cli_ok("rm", root, step + 1)),
    ]
    for name, run in operations:
        try:
            run()
        except (OSError, ValueError) as e:  # refusing with a clear error is allowed
            errors.append(f"{name}: {type(e).__name__}: {e}")
    return errors


def _cli_ok(*args):
    result = cli(*args)
    if result.returncode != 0:
        raise OSError(result.stderr.strip())


def _check_survives(outside, before, tally, scenario):
    after = fingerprint(outside)
    ok = after == before
    tally.record(ATTACKS, ok, scenario if ok else f"{scenario}: OUTSIDE DAMAGED")
    assert ok, (
        f"{scenario}: files outside the root were deleted or changed: {sorted(set(before) - set(after))}"
    )


def _committed_intact(root, steps):
    for step in steps:
        assert state_problem(jckpt.restore(root, step=step), step) is None
        jckpt.verify(root, step)


def _step_dir_homes(root):
    """Where step-named directories live: the root, and every directory holding step_* entries."""
    homes = {root}
    for current, dirs, names in os.walk(root):
        if any(re.fullmatch(r"step_\d+", n) for n in dirs + names):
            homes.add(type(root)(current))
    return sorted(homes)


def test_a_symlink_named_like_a_step_is_never_followed(setup, tally):
    root, outside = setup
    before = fingerprint(outside)
    for home in _step_dir_homes(root):
        os.symlink(outside, home / "step_00000005", target_is_directory=True)
    _mutate(root, 10)
    _check_survives(outside, before, tally, "symlink named like a step")
    _committed_intact(root, [0, 1])


@pytest.mark.parametrize("name", ["ddeadbeef", "elsewhere"])
def test_a_symlinked_directory_inside_a_committed_step_is_never_followed(setup, tally, name):
    root, outside = setup
    before = fingerprint(outside)
    (data_dir,) = data_dirs_of(root, 0)
    os.symlink(outside, data_dir.parent / name, target_is_directory=True)
    _mutate(root, 10)
    _check_survives(outside, before, tally, "extra symlinked directory in a step")


def test_a_committed_data_directory_replaced_by_a_symlink_never_loses_its_target(setup, tally):
    root, outside = setup
    (data_dir,) = data_dirs_of(root, 0)
    moved = outside / "moved"
    shutil.move(data_dir, moved)
    os.symlink(moved, data_dir, target_is_directory=True)
    before = fingerprint(outside)
    _mutate(root, 10)
    _check_survives(outside, before, tally, "data directory replaced by a symlink")


def test_a_symlinked_chunk_file_is_unlinked_not_followed(setup, tally):
    root, outside = setup
    (data_dir,) = data_dirs_of(root, 0)
    victims = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix != ".json"]
    for i, path in enumerate(victims):
        target = outside / f"chunk{i}"
        shutil.copyfile(path, target)
        path.unlink()
        os.symlink(target, path)
    before = fingerprint(outside)
    jckpt.save(
        root, expected_state(2), step=2, options=jckpt.SaveOptions(**OPTIONS)
    )  # full: 0's chunks unused
    for step in (0, 1):
        jckpt.delete(root, step)
    assert cli("gc", root).returncode == 0
    _check_survives(outside, before, tally, "chunk file replaced by a symlink")
    _committed_intact(root, [2])


def test_a_foreign_symlink_in_the_root_is_never_followed(setup, tally):
    root, outside = setup
    before = fingerprint(outside)
    os.symlink(outside, root / "junk", target_is_directory=True)
    os.symlink(outside / "precious.txt", root / "notes.txt")
    _mutate(root, 10)
    _check_survives(outside, before, tally, "foreign symlinks in the root")
    assert (root / "junk").is_symlink() and (root / "notes.txt").is_symlink()


# ------------------------------------------------------------------ hostile key names

HOSTILE = [
    "..",
    ".",
    "/",
    "a/b",
    "../../escape",
    "/abs/path",
    "\x00",
    "a\x00b",
    "x" * 10_000,
    "step_00000009",
    "manifest.json",
    "zarr.json",
    "jckpt.json",
    "c",
    "packed",
    "%2F",
    "%",
    "\n",
    " ",
    "",
    "ключ",
    "😀",
    "a\\b",
    "*",
    "~",
    ".__lock",
]


@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: repr(n)[:30])
def test_a_hostile_key_name_round_trips_or_is_refused_inside_the_root(tmp_path, tally, name):
    root = tmp_path / "root"
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("keep")
    state = {
        name: {name: np.arange(5, dtype=np.int16), "big": np.arange(70_000, dtype=np.float32)},
        "ok": np.ones(2),
    }
    before = {k: v for k, v in fingerprint(tmp_path).items() if not k.startswith("root")}
    try:
        jckpt.save(root, state, step=0)
    except (ValueError, TypeError) as e:  # a clear refusal is fine
        outcome = f"refused ({type(e).__name__})"
        assert jckpt.all_steps(root) == []
    else:
        restored = jckpt.restore(root)
        assert restored[name][name].tolist() == list(range(5)) and restored[name][name].dtype == np.int16
        assert np.array_equal(restored[name]["big"], state[name]["big"])
        liked = jckpt.restore(root, like=state)
        assert liked[name][name].tolist() == list(range(5))
        jckpt.verify(root)
        jckpt.delete(root, 0)
        assert cli("gc", root).returncode == 0
        outcome = "round trip"
    after = {k: v for k, v in fingerprint(tmp_path).items() if not k.startswith("root")}
    tally.record(
        "hostile key names", after == before, outcome if after == before else "WROTE OUTSIDE THE ROOT"
    )
    assert after == before, "something was written outside the root"


@pytest.mark.parametrize("name", ["with space", "per%25cent", "ünï", "a..b", "-dash"])
def test_odd_root_paths_work(tmp_path, name):
    root = tmp_path / name
    jckpt.save(root, expected_state(0), step=0, options=jckpt.SaveOptions(**OPTIONS))
    assert state_problem(jckpt.restore(root), 0) is None
    assert cli("verify", root, "--all").returncode == 0


# ------------------------------------------------------------------ a copied step


def _copy_step(root, src: int, dst: int):
    """Copies step ``src`` to ``dst`` as a user would with cp -r (the step directory, or the manifest)."""
    (manifest,) = manifest_files(root, src)
    src_dir, dst_name = f"step_{src:08d}", f"step_{dst:08d}"
    if manifest.parent.name == src_dir:  # version 1: everything of a step in its directory
        shutil.copytree(manifest.parent, manifest.parent.with_name(dst_name), symlinks=True)
    else:
        shutil.copyfile(manifest, manifest.with_name(manifest.name.replace(src_dir, dst_name)))


def test_a_copied_step_is_not_taken_for_another_step(setup, tally):
    root, _ = setup
    _copy_step(root, 1, 7)
    listed = 7 in jckpt.all_steps(root)
    if listed:
        try:
            jckpt.restore(root, step=7)
            outcome = "listed and restores step 1's data as step 7"
        except jckpt.CorruptCheckpointError:
            outcome = "listed, restore says corrupt"
    else:
        outcome = "not listed"
    steps_before = jckpt.all_steps(root)
    collected = cli("gc", root)  # succeeds, or refuses naming the damaged step; never deletes data
    assert collected.returncode == 0 or "step 7" in collected.stderr, collected.stderr
    ok = outcome != "listed and restores step 1's data as step 7" and jckpt.all_steps(root) == steps_before
    tally.record("copied step directory", ok, outcome)
    _committed_intact(root, [0, 1])
    assert ok, f"{outcome}; listed before gc {steps_before}, after {jckpt.all_steps(root)}"
