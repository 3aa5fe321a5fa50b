"""Corruption of every file kind (issue 9 defects 3 and 7).

A corrupted manifest or root marker (bit flips sampled in every field, truncation,
garbage, missing fields) raises CorruptCheckpointError naming the step; a corrupted
chunk or array metadata file makes exactly the steps that use it fail restore and
verify with CorruptCheckpointError.  Never wrong data, never another exception.

Each test corrupts one file, checks, and puts the original bytes back.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import pytest
from advutil import (
    OPTIONS,
    cli,
    data_files,
    expected_state,
    files,
    json_tokens,
    manifest_files,
    marker_file,
    one_line_error,
)
from advutil import state_problem as _state_problem

import jckpt

N_CHUNKS = 5  # big: 320 KiB, a chunked array
STEPS = (0, 1, 2)  # 0 full, 1 and 2 incremental (reusing chunks of 0 and 1)
RNG_SEED = 9


def state_problem(restored, step):
    return _state_problem(restored, step, N_CHUNKS)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "root"
    for step in STEPS:
        state = expected_state(step, N_CHUNKS)
        kind = "full" if step == 0 else "incremental"
        jckpt.save(
            root,
            state,
            step=step,
            kind=kind,
            metrics={"loss": 1.0 / (step + 1)},
            metadata={"run": "adv"},
            options=jckpt.SaveOptions(**OPTIONS),
        )
    assert jckpt.info(root, 2).kind == "incremental"
    return root


@pytest.fixture
def root(pristine, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


def _names_step(error: BaseException, step: int) -> bool:
    return re.search(rf"step[ _:=]*0*{step}\b", str(error)) is not None


def _outcomes(root, step) -> dict[str, str]:
    """What restore / verify / info of ``step`` do: "corrupt" (the wanted error), or what went wrong."""
    out = {}
    for op in ("restore", "verify", "info"):
        try:
            if op == "restore":
                problem = state_problem(jckpt.restore(root, step=step), step)
            elif op == "verify":
                jckpt.verify(root, step)
                problem = None
            else:
                jckpt.info(root, step)
                problem = None
        except jckpt.CorruptCheckpointError as e:
            out[op] = "corrupt" if _names_step(e, step) else "corrupt, step not named"
        except Exception as e:  # noqa: BLE001 - every other outcome is reported
            out[op] = type(e).__name__
        else:
            out[op] = "WRONG DATA" if problem else "no error"
    return out


def _worst(outcomes: dict[str, str]) -> str:
    for bad in ("WRONG DATA", "no error"):
        if bad in outcomes.values():
            return bad
    others = sorted({v for v in outcomes.values() if v != "corrupt"})
    return others[0] if others else "corrupt"


def _corrupt_and_check(path, new_bytes, check):
    original = path.read_bytes()
    path.write_bytes(new_bytes)
    try:
        return check()
    finally:
        path.write_bytes(original)


def _run_manifest_trials(root, step, corruptions, tally, scenario):
    """corruptions: [(label, bytes)]; each must make restore, verify and info raise CorruptCheckpointError."""
    (manifest,) = manifest_files(root, step)
    failures = []
    for label, data in corruptions:
        outcomes = _corrupt_and_check(manifest, data, lambda: _outcomes(root, step))
        worst = _worst(outcomes)
        tally.record(scenario, worst == "corrupt", worst)
        if worst != "corrupt":
            failures.append(f"{label}: {outcomes}")
    assert state_problem(jckpt.restore(root, step=step), step) is None  # put back intact
    assert not failures, f"{len(failures)} of {len(corruptions)} corruptions not caught:\n" + "\n".join(
        failures[:25]
    )


# ------------------------------------------------------------------ manifests


def _flips(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """One flipped bit in every JSON token (every key and every value), plus a few structural bytes."""
    text = data.decode()
    out = []
    for start, end, kind in json_tokens(text):
        offset = rng.randrange(start, end)
        bit = rng.randrange(8)
        flipped = bytearray(data)
        flipped[offset] ^= 1 << bit
        out.append((f"{kind} {text[start:end][:40]!r} byte {offset} bit {bit}", bytes(flipped)))
    structural = [i for i, c in enumerate(text) if c in "{}[],:"]
    for offset in rng.sample(structural, min(10, len(structural))):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << rng.randrange(8)
        out.append((f"structural byte {offset} {text[offset]!r}", bytes(flipped)))
    return out


@pytest.mark.parametrize("step", [0, 2])
def test_a_flipped_bit_in_any_manifest_field_is_corrupt_never_wrong_data(root, tally, step):
    (manifest,) = manifest_files(root, step)
    flips = _flips(manifest.read_bytes(), random.Random(RNG_SEED + step))
    assert len(flips) > 50, "expected a manifest with many fields"
    _run_manifest_trials(root, step, flips, tally, "manifest: one bit flipped per field")


def test_a_truncated_manifest_is_corrupt(root, tally):
    (manifest,) = manifest_files(root, 2)
    data = manifest.read_bytes()
    cuts = sorted({0, 1, 2, len(data) // 3, len(data) // 2, len(data) - 2, len(data) - 1})
    _run_manifest_trials(root, 2, [(f"cut at {n}", data[:n]) for n in cuts], tally, "manifest: truncated")


GARBAGE = {
    "random bytes": bytes(random.Random(1).randrange(256) for _ in range(300)),
    "zeros": bytes(300),
    "not utf-8": b'{"format": "\xff\xfe"}',
    "json null": b"null",
    "json list": b"[]",
    "json string": b'"manifest"',
    "json number": b"17",
    "empty object": b"{}",
}


@pytest.mark.parametrize(
    "what",
    [
        pytest.param(
            name
        )
        if name in ("json null", "json list", "json string", "json number", "empty object")
        else name
        for name in GARBAGE
    ],
)
def test_a_garbage_manifest_is_corrupt(root, tally, what):
    _run_manifest_trials(root, 2, [(what, GARBAGE[what])], tally, "manifest: garbage")


def _without(doc, path):
    """A deep copy of ``doc`` without the key at ``path`` (a tuple of keys / indices)."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return doc


def _field_paths(doc):
    """Every dict key at depth <= 3 (the top-level fields, those of records, of leaves, ...)."""
    out = []
    stack = [((), doc)]
    while stack:
        path, node = stack.pop()
        if len(path) > 3:
            continue
        if isinstance(node, dict):
            for key, value in node.items():
                out.append((*path, key))
                stack.append(((*path, key), value))
        elif isinstance(node, list) and node:
            stack.append(((*path, 0), node[0]))
            stack.append(((*path, len(node) - 1), node[-1]))
    return sorted(set(out), key=str)


def test_a_manifest_missing_any_field_is_corrupt(root, tally):
    (manifest,) = manifest_files(root, 2)
    doc = json.loads(manifest.read_bytes())
    paths = _field_paths(doc)
    assert len(paths) > 20
    corruptions = [(f"without {'/'.join(map(str, p))}", json.dumps(_without(doc, p)).encode()) for p in paths]
    _run_manifest_trials(root, 2, corruptions, tally, "manifest: a field missing")


def test_the_cli_reports_a_manifest_missing_fields_in_one_line(root):
    (manifest,) = manifest_files(root, 2)
    doc = json.loads(manifest.read_bytes())
    manifest.write_text(json.dumps({k: v for k, v in doc.items() if k in ("format", "version")}))
    for args in (["verify", root, "--step", "2"], ["info", root, "--step", "2"], ["verify", root, "--all"]):
        one_line_error(cli(*args))


# ------------------------------------------------------------------ the root marker


def _marker_outcome(root) -> str:
    """restore, all_steps and save on a root whose marker is corrupt must all raise CorruptCheckpointError."""
    before = {str(p): p.read_bytes() for p in files(root)}
    outcomes = []
    for op in ("restore", "all_steps", "save"):
        try:
            if op == "restore":
                problem = state_problem(jckpt.restore(root, step=2), 2)
            elif op == "all_steps":
                jckpt.all_steps(root)
                problem = None
            else:
                jckpt.save(root, {"x": 1}, step=99)
                problem = "saved into it"
        except jckpt.CorruptCheckpointError:
            outcomes.append("corrupt")
        except Exception as e:  # noqa: BLE001
            outcomes.append(type(e).__name__)
        else:
            outcomes.append("WRONG DATA" if problem else "no error")
    after = {str(p): p.read_bytes() for p in files(root)}
    if after != before:
        outcomes.append("FILES CHANGED")
        for path in set(after) - set(before):
            os.unlink(path)
    return _worst(dict(enumerate(outcomes))) if "FILES CHANGED" not in outcomes else "FILES CHANGED"


def _run_marker_trials(root, corruptions, tally, scenario):
    marker = marker_file(root)
    failures = []
    for label, data in corruptions:
        worst = _corrupt_and_check(marker, data, lambda: _marker_outcome(root))
        tally.record(scenario, worst == "corrupt", worst)
        if worst != "corrupt":
            failures.append(f"{label}: {worst}")
    assert not failures, f"{len(failures)} of {len(corruptions)} not caught:\n" + "\n".join(failures)


def test_a_flipped_bit_in_the_root_marker_is_corrupt(root, tally):
    marker = marker_file(root)
    flips = _flips(marker.read_bytes(), random.Random(RNG_SEED))
    _run_marker_trials(root, flips, tally, "root marker: one bit flipped per field")


def test_a_garbled_root_marker_is_corrupt(root, tally):
    data = marker_file(root).read_bytes()
    corruptions = [(f"cut at {n}", data[:n]) for n in (0, 1, len(data) // 2, len(data) - 1)]
    corruptions += list(GARBAGE.items())
    doc = json.loads(data)
    corruptions += [
        (f"without {key}", json.dumps({k: v for k, v in doc.items() if k != key}).encode()) for key in doc
    ]
    _run_marker_trials(root, corruptions, tally, "root marker: truncated / garbage / field missing")


def test_the_cli_reports_a_garbled_root_marker_in_one_line(root):
    marker_file(root).write_bytes(b"\xff\x00garbage")
    for args in (["ls", root], ["verify", root, "--all"], ["gc", root], ["rm", root, "1"], ["info", root]):
        one_line_error(cli(*args))
    assert {p.name for p in manifest_files(root)} and len(manifest_files(root)) == len(STEPS), "rm/gc deleted"


def test_a_deleted_root_marker_hides_nothing_silently(root):
    marker_file(root).unlink()
    before = sorted(map(str, files(root)))
    with pytest.raises((FileNotFoundError, jckpt.CorruptCheckpointError)):
        jckpt.restore(root)
    with pytest.raises(OSError):  # never re-created over the steps already there
        jckpt.save(root, expected_state(9, N_CHUNKS), step=9)
    assert sorted(map(str, files(root))) == before


# ------------------------------------------------------------------ chunks and array metadata


def _data_outcomes(root) -> dict[int, str]:
    """Per step: "intact" (exact and verifies) or "corrupt" (restore and verify both raise it), else what."""
    out = {}
    for step in STEPS:
        outcomes = _outcomes(root, step)
        restore, verify = outcomes["restore"], outcomes["verify"]
        if restore == verify == "no error":
            out[step] = "intact"
        elif restore == verify == "corrupt":
            out[step] = "corrupt"
        else:
            out[step] = f"restore: {restore}, verify: {verify}"
    return out


def _outcomes_with(root, path, data):
    """Every step's outcome (see _data_outcomes) while ``path`` holds ``data`` (None: deleted)."""
    original = path.read_bytes()
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
    try:
        return _data_outcomes(root)
    finally:
        path.write_bytes(original)


def _run_data_trials(root, corruptions, tally, scenario, *, may_be_harmless=False):
    """corruptions: [(label, path, new bytes or None to delete)].

    Each must leave every step either intact or failing restore and verify alike with
    CorruptCheckpointError, and fail at least one step -- unless ``may_be_harmless``: a
    flip in the padding of a partial last chunk (zarr stores it whole) changes no value;
    then at least half of the corruptions must still be caught.
    """
    failures, harmless = [], 0
    for label, path, data in corruptions:
        outcomes = _outcomes_with(root, path, data)
        consistent = set(outcomes.values()) <= {"intact", "corrupt"}
        caught = consistent and "corrupt" in outcomes.values()
        harmless += consistent and not caught
        ok = caught or (consistent and may_be_harmless)
        tally.record(scenario, ok, "caught" if caught else "no value changed" if ok else "MISSED")
        if not ok:
            failures.append(f"{label}: {outcomes}")
    assert not failures, f"{len(failures)} of {len(corruptions)} not caught:\n" + "\n".join(failures)
    assert harmless <= len(corruptions) // 2, f"{harmless} of {len(corruptions)} corruptions changed nothing"


def test_a_flipped_bit_in_any_chunk_file_fails_exactly_the_steps_using_it(root, tally):
    rng = random.Random(RNG_SEED)
    corruptions = []
    for path in data_files(root):
        data = bytearray(path.read_bytes())
        if not data:
            continue
        offset, bit = rng.randrange(len(data)), rng.randrange(8)
        data[offset] ^= 1 << bit
        corruptions.append((f"{path.relative_to(root)} byte {offset} bit {bit}", path, bytes(data)))
    assert len(corruptions) >= 4
    _run_data_trials(root, corruptions, tally, "chunk file: one bit flipped", may_be_harmless=True)


def test_a_truncated_emptied_or_missing_chunk_file_fails_the_steps_using_it(root, tally):
    corruptions = []
    for path in data_files(root):
        data = path.read_bytes()
        corruptions += [
            (f"{path.relative_to(root)} truncated", path, data[: len(data) // 2]),
            (f"{path.relative_to(root)} emptied", path, b""),
            (f"{path.relative_to(root)} deleted", path, None),
        ]
    _run_data_trials(root, corruptions, tally, "chunk file: truncated / emptied / deleted")


def test_array_metadata_files_are_not_trusted(root, tally):
    """Each array's zarr.json is written for other tools; jckpt takes the metadata from the
    checksummed manifest, so no change to a zarr.json changes what any step restores."""
    manifests = set(manifest_files(root)) | {marker_file(root)}
    metadata = [p for p in files(root) if p.suffix == ".json" and p not in manifests]
    assert metadata, "expected per-array metadata files (zarr.json)"
    failures = []
    for path in metadata:
        data = path.read_bytes()
        doc = json.loads(data)
        other = {"uint8": "int8", "int32": "float32"}.get(doc["data_type"], "int32")
        for label, new in [
            ("deleted", None),
            ("garbage", b"\x00garbage"),
            ("shape+1", json.dumps({**doc, "shape": [n + 1 for n in doc["shape"]]}).encode()),
            ("dtype", json.dumps({**doc, "data_type": other}).encode()),
        ]:
            outcomes = _outcomes_with(root, path, new)
            ok = set(outcomes.values()) == {"intact"}
            tally.record("array metadata (zarr.json): deleted / garbage / shape / dtype", ok,
                         "ignored" if ok else "MISSED")
            if not ok:
                failures.append(f"{path.relative_to(root)} {label}: {outcomes}")
    assert not failures, "\n".join(failures)


def test_restores_are_exact_when_nothing_is_corrupt(root):
    for step in STEPS:
        assert state_problem(jckpt.restore(root, step=step), step) is None
        jckpt.verify(root, step)
    assert np.asarray(jckpt.restore(root)["big"]).dtype == np.float32
