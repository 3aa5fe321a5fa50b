"""Tags, lineage and metadata: naming versions, keeping them, knowing where they came from."""

import jax
import numpy as np
import pytest

import jckpt
from jckpt import policy as P


def _save(root, step):
    return jckpt.save(root, {"w": np.full(3, step), "k": jax.random.key(step)}, step=step)


def test_a_tag_stands_wherever_a_step_goes(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    jckpt.tag(tmp_path, 2, "prod")
    assert jckpt.tags(tmp_path) == {"prod": 2}
    assert jckpt.restore(tmp_path, step="prod")["w"].tolist() == [2, 2, 2]
    assert jckpt.info(tmp_path, "prod").step == 2 and jckpt.verify(tmp_path, "prod").step == 2
    jckpt.tag(tmp_path, "prod", "golden")  # a tag of a tag names the same step
    with pytest.raises(ValueError, match="already names step 2"):
        jckpt.tag(tmp_path, 3, "prod")
    jckpt.tag(tmp_path, 3, "prod", force=True)
    assert jckpt.tags(tmp_path) == {"golden": 2, "prod": 3}
    with pytest.raises(jckpt.CheckpointNotFoundError, match="no tag 'nope'"):
        jckpt.restore(tmp_path, step="nope")
    for bad in ("3", "../x", "", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="invalid tag name"):
            jckpt.tag(tmp_path, 1, bad)


def test_a_tagged_step_cannot_be_deleted_until_untagged(tmp_path):
    _save(tmp_path, 1)
    jckpt.tag(tmp_path, 1, "prod")
    with pytest.raises(jckpt.StepTaggedError, match=r"step 1 .* tagged \['prod'\]"):
        jckpt.delete(tmp_path, 1)
    with pytest.raises(PermissionError):
        jckpt.delete(tmp_path, 1)
    assert jckpt.all_steps(tmp_path) == [1]
    jckpt.untag(tmp_path, "prod")
    with pytest.raises(jckpt.CheckpointNotFoundError):
        jckpt.untag(tmp_path, "prod")
    jckpt.delete(tmp_path, 1)
    assert jckpt.all_steps(tmp_path) == []


def test_retention_never_deletes_a_tagged_step(tmp_path):
    with jckpt.CheckpointManager(tmp_path, policy=P.combine(P.every_n_steps(1), P.keep_last(2))) as mngr:
        for step in range(6):
            mngr.maybe_save(step, {"w": np.full(3, step)})
            mngr.wait()
            if step == 1:
                jckpt.tag(tmp_path, 1, "best")
    assert jckpt.all_steps(tmp_path) == [1, 4, 5]


def test_lineage_is_recorded_and_shown(tmp_path):
    info = _save(tmp_path, 1)
    lineage = info.lineage
    assert lineage["versions"]["jax"] == jax.__version__ and "jckpt" in lineage["versions"]
    assert lineage["process_count"] == 1 and lineage["device_count"] == len(jax.devices())
    assert lineage["host"] and lineage["command"] and lineage["base_step"] is None
    assert jckpt.info(tmp_path).lineage == lineage
    origin = {"origin": "npz:/x.npz"}
    info = jckpt.save(tmp_path, {"w": np.ones(3)}, step=2, kind="incremental", lineage=origin)
    assert info.lineage["base_step"] == 1 and info.lineage["origin"] == "npz:/x.npz"


def test_metadata_is_the_saved_tree_and_a_valid_like(tmp_path):
    state = {"params": {"w": np.ones((4, 3), np.float32)}, "rng": jax.random.key(0), "n": None, "step": 7}
    jckpt.save(tmp_path, state, step=7)
    like = jckpt.metadata(tmp_path)
    assert like["params"]["w"] == jax.ShapeDtypeStruct((4, 3), np.float32)
    assert like["n"] is None and like["step"].shape == ()
    assert jax.dtypes.issubdtype(like["rng"].dtype, jax.dtypes.prng_key)
    restored = jckpt.restore(tmp_path, like=like)
    assert isinstance(restored["params"]["w"], jax.Array) and restored["params"]["w"].shape == (4, 3)


def test_diff_reports_per_leaf_changes_with_magnitudes(tmp_path):
    a = {"w": np.ones((300, 300), np.float32), "b": np.zeros(4), "gone": np.ones(2), "same": np.arange(5.0)}
    jckpt.save(tmp_path, a, step=1)
    b = {"w": a["w"].copy(), "b": np.zeros(5), "new": np.ones(1), "same": a["same"]}
    b["w"][0, 0] = 4.0
    jckpt.save(tmp_path, b, step=2)
    report = {d.path: d for d in jckpt.diff(tmp_path, 1, 2)}
    assert {p: d.status for p, d in report.items()} == {
        "w": "changed", "b": "shape", "gone": "removed", "same": "same", "new": "added"
    }
    assert report["w"].max_abs == 3.0
    assert report["w"].rel_l2 == pytest.approx(3.0 / 300.0)
    assert report["b"].a == "float64[4]" and report["b"].b == "float64[5]"
    jckpt.save(tmp_path / "other", b, step=9)  # across roots
    assert all(d.status == "same" for d in jckpt.diff(tmp_path, 2, 9, directory_b=tmp_path / "other"))
