"""Host state in the commit: data iterators (Grain), numpy and Python generators, any get_state()/set_state()
object, saved per process with the arrays and restored into the live objects of ``like``."""

import json
import random
import warnings

import grain
import grain.python as gp
import jax
import numpy as np
import pytest
from helpers import assert_trees_equal
from servers import gcs_root, gcs_server, s3_root, s3_server, server_logs  # noqa: F401  (fixtures)

import jckpt
from jckpt import format as fmt
from jckpt.cli import main as cli
from jckpt.root import Root


def _dataset(seed=3):
    return grain.MapDataset.range(40).shuffle(seed=seed).map(lambda x: x * 10).batch(4)


def _loader(seed=0):
    sampler = gp.IndexSampler(40, shard_options=gp.NoSharding(), shuffle=True, seed=seed, num_epochs=2)
    source = gp.RangeDataSource(0, 40, 1)
    return gp.DataLoader(data_source=source, sampler=sampler, operations=[gp.Batch(3)], worker_count=0)


class Counter:
    """A user object: its state is JSON-like (a dict holding lists, strings, None)."""

    def __init__(self, start=0):
        self.n, self.seen = start, []

    def draw(self):
        self.n += 1
        self.seen.append(f"item-{self.n}")
        return self.n

    def get_state(self):
        return {"n": self.n, "seen": list(self.seen), "note": None, "ratio": 0.5, "done": False}

    def set_state(self, state):
        self.n, self.seen = state["n"], list(state["seen"])


def _draws(objects):
    """The next value of each object (a batch, a float, an int)."""
    out = []
    for obj in objects:
        if isinstance(obj, np.random.Generator):
            out.append(obj.random(3).tolist())
        elif isinstance(obj, random.Random):
            out.append([obj.random(), obj.gauss(0, 1)])
        elif isinstance(obj, Counter):
            out.append(obj.draw())
        else:
            out.append(np.asarray(next(obj)).tolist())
    return out


def _fresh():
    gens = [np.random.Generator(np.random.PCG64(1)), np.random.Generator(np.random.MT19937(2)),
            np.random.Generator(np.random.Philox(3)), np.random.Generator(np.random.SFC64(4))]  # fmt: skip
    return [iter(_dataset()), iter(_loader()), *gens, random.Random(5), Counter()]


def _tree(objects, w):
    """The objects nested in dicts and lists, beside arrays."""
    it, loader, *gens, py, user = objects
    return {"params": {"w": w}, "data": {"train": it, "loader": loader}, "rngs": [gens, py], "user": user}


def test_every_kind_round_trips_nested_in_dicts_and_lists(tmp_path):
    live = _fresh()
    for _ in range(3):
        _draws(live)
    live[6].gauss(0, 1)  # a random.Random with a cached Gaussian
    w = np.arange(6.0)
    jckpt.save(tmp_path, _tree(live, w), step=7)
    expected = [_draws(live) for _ in range(4)]  # what the saved objects would draw next

    targets = _fresh()
    restored = jckpt.restore(tmp_path, like=_tree(targets, np.zeros(6)))
    assert restored["data"]["train"] is targets[0] and restored["user"] is targets[-1]
    assert restored["rngs"][0][1] is targets[3]
    np.testing.assert_array_equal(restored["params"]["w"], w)
    assert [_draws(targets) for _ in range(4)] == expected


def test_the_state_saved_is_the_one_at_the_call(tmp_path):
    """get_state() is called in snapshot(): later draws do not leak into the save written afterwards."""
    it = iter(_dataset())
    next(it)
    snap = jckpt.snapshot({"it": it})
    after = [np.asarray(next(it)).tolist() for _ in range(2)]
    jckpt.save_snapshot(tmp_path, snap, step=0)
    again = jckpt.restore(tmp_path, like={"it": iter(_dataset())})["it"]
    assert [np.asarray(next(again)).tolist() for _ in range(2)] == after


def test_without_like_generators_come_back_new_and_objects_as_their_state(tmp_path):
    it, rng, py, user = iter(_dataset()), np.random.default_rng(9), random.Random(2), Counter(4)
    next(it), rng.random(), py.random(), user.draw()
    jckpt.save(tmp_path, {"it": it, "rng": rng, "py": py, "user": user, "loader": iter(_loader())}, step=0)
    restored = jckpt.restore(tmp_path)
    assert restored["it"] == it.get_state() == {"next_index": 1}
    assert restored["user"] == json.loads(json.dumps(user.get_state()))
    assert isinstance(restored["loader"], bytes)  # Grain's DataLoader state is JSON bytes
    assert restored["rng"].random() == rng.random() and restored["py"].random() == py.random()


def test_metadata_shows_host_states_and_works_as_like(tmp_path):
    it, rng = iter(_dataset()), np.random.default_rng(0)
    next(it)
    jckpt.save(tmp_path, {"w": np.ones(3, np.float32), "it": it, "rng": rng}, step=1)
    meta = jckpt.metadata(tmp_path)
    assert isinstance(meta["it"], jckpt.HostState) and meta["it"].kind == "object"
    assert meta["it"].type_name.endswith("DatasetIterator") and meta["it"].process_count == 1
    assert meta["rng"].kind == "numpy.random.Generator" and meta["rng"].nbytes > 0
    assert isinstance(meta["w"], jax.ShapeDtypeStruct)
    restored = jckpt.restore(tmp_path, like=meta)
    assert restored["it"] == {"next_index": 1} and isinstance(restored["rng"], np.random.Generator)
    info = jckpt.info(tmp_path)
    assert info.host_states == 2
    assert info.bytes_total == 12 + meta["it"].nbytes + meta["rng"].nbytes


class BadState:
    def __init__(self, state):
        self.state = state

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


@pytest.mark.parametrize(
    "state, why",
    [
        ({"a": np.arange(3)}, "ndarray"),
        ({"a": {1, 2}}, "set"),
        ({1: "a"}, "keys must be strings"),
        (object(), "object"),
        ({"x": np.int64(3)}, "int64"),
    ],
)
def test_an_unserialisable_state_is_a_type_error_naming_the_leaf_and_nothing_is_committed(
    tmp_path, state, why
):
    jckpt.save(tmp_path, {"w": np.ones(2)}, step=0)
    with pytest.raises(TypeError, match=f"leaf 'data/0'.*{why}"):
        jckpt.save(tmp_path, {"w": np.ones(2), "data": [BadState(state)]}, step=1)
    assert jckpt.all_steps(tmp_path) == [0]
    cycle = []
    cycle.append(cycle)
    with pytest.raises(TypeError, match="leaf 'c'.*Circular"):
        jckpt.save(tmp_path, {"c": BadState(cycle)}, step=1)
    assert jckpt.all_steps(tmp_path) == [0]


def test_tuples_come_back_as_lists_and_bytes_as_bytes(tmp_path):
    saved = {"a": BadState({"t": (1, 2)}), "b": BadState(b"\x00\xffraw"), "e": BadState(b"")}
    jckpt.save(tmp_path, saved, step=0)
    a, b, e = BadState(None), BadState(None), BadState(None)
    jckpt.restore(tmp_path, like={"a": a, "b": b, "e": e})
    assert (a.state, b.state, e.state) == ({"t": [1, 2]}, b"\x00\xffraw", b"")


def test_a_like_of_another_kind_is_a_tree_mismatch(tmp_path):
    jckpt.save(tmp_path, {"rng": np.random.default_rng(0), "w": np.ones(2)}, step=0)
    with pytest.raises(jckpt.TreeMismatchError, match="'rng'.*numpy.random._generator.Generator.*Random"):
        jckpt.restore(tmp_path, like={"rng": random.Random(), "w": np.ones(2)})
    with pytest.raises(jckpt.TreeMismatchError, match="'w'.*float64 array.*Counter"):
        jckpt.restore(tmp_path, like={"w": Counter()})


def test_a_failing_set_state_names_the_leaf(tmp_path):
    jckpt.save(tmp_path, {"it": iter(_dataset())}, step=0)
    with pytest.raises(ValueError, match="leaf 'it'.*Counter.*KeyError"):
        jckpt.restore(tmp_path, like={"it": Counter()})


def test_a_damaged_state_is_corruption_and_no_object_is_changed(tmp_path):
    user = Counter(3)
    jckpt.save(tmp_path, {"user": user, "w": np.arange(5.0)}, step=0)
    manifest = Root(tmp_path).read_manifest(0)
    blob = next(iter(manifest.blobs.values()))
    chunk = tmp_path / manifest.data_dir / blob.name / "c" / "0"
    data = bytearray(chunk.read_bytes())
    (state,) = next(leaf for leaf in manifest.leaves if leaf.path == "user").states
    data[state.offset + 2] ^= 1
    chunk.write_bytes(bytes(data))
    target = Counter(0)
    with pytest.raises(jckpt.CorruptCheckpointError, match="step 0"):
        jckpt.restore(tmp_path, like={"user": target, "w": np.zeros(5)})
    assert target.n == 0
    with pytest.raises(jckpt.CorruptCheckpointError, match="step 0"):
        jckpt.verify(tmp_path)


def test_another_process_count_needs_map_states(tmp_path):
    """A manifest saved by 2 processes (written here by merging two fragments), restored by 1."""
    from jckpt import write as write_lib
    from jckpt.root import new_data_dir
    from jckpt.snapshots import snapshot

    root = Root(tmp_path)
    root.ensure()
    data_dir = new_data_dir(3)
    options = write_lib.SaveOptions()
    fragments, records = [], None
    for process, position in enumerate((2, 5)):  # two processes, each at its own position
        it = iter(_dataset())
        for _ in range(position):
            next(it)
        snap = snapshot({"it": it, "w": np.ones(2)})._replace(process_index=process)
        leaf = snap.leaves[0]
        shard = leaf.shards[0]._replace(region=(slice(process, process + 1),))
        snap.leaves[0] = leaf._replace(shards=[shard])
        if process:
            snap.leaves[1] = snap.leaves[1]._replace(shards=[])  # arrays: process 0's
        records = write_lib.plan(snap, options)
        fragments.append(write_lib.write_fragment(root, data_dir, snap, records, options))
    manifest = write_lib.assemble(
        records, fragments, step=3, base_step=None, data_dir=data_dir, options=options, metrics=None,
        metadata=None, created=0.0, save_seconds=0.0,
    )  # fmt: skip
    root.commit(manifest)
    with pytest.raises(ValueError, match="leaf 'it'.*saved by 2 process.*this run has 1.*map_states"):
        jckpt.restore(tmp_path, like={"it": iter(_dataset()), "w": np.ones(2)})
    jckpt.restore(tmp_path, like={"w": np.ones(2)})  # a like without the host state: no question asked
    seen = []

    def furthest(path, states):
        seen.append((path, states))
        return [max(states, key=lambda s: s["next_index"])]

    it = jckpt.restore(tmp_path, like={"it": iter(_dataset())}, map_states=furthest)["it"]
    assert seen == [("it", [{"next_index": 2}, {"next_index": 5}])] and it.get_state() == {"next_index": 5}
    with pytest.raises(ValueError, match="map_states returned 2 states for 1 process"):
        jckpt.restore(tmp_path, like={"it": iter(_dataset())}, map_states=lambda path, states: states)


def test_incremental_saves_reuse_an_unchanged_state_and_write_a_changed_one(tmp_path):
    big = BadState({"buffer": list(range(50_000))})  # a shuffle buffer of ~300 KB
    it = iter(_dataset())
    w = np.zeros(100_000, np.float32)
    jckpt.save(tmp_path, {"w": w, "big": big, "it": it}, step=0)
    next(it)
    info = jckpt.save(tmp_path, {"w": w, "big": big, "it": it}, step=1, kind="incremental")
    assert info.bytes_written < 1000  # only the iterator's changed state (and its alignment)
    first, second = (Root(tmp_path).read_manifest(s) for s in (0, 1))
    states = {m.step: {x.path: x.states[0] for x in m.leaves if x.states} for m in (first, second)}
    assert states[1]["big"] == states[0]["big"]  # reused: the bytes of step 0's blob
    assert states[1]["it"].blob.startswith(second.data_dir)
    jckpt.delete(tmp_path, 0)
    targets = {"w": np.zeros(100_000, np.float32), "big": BadState(None), "it": iter(_dataset())}
    restored = jckpt.restore(tmp_path, like=targets)
    assert restored["big"].state == big.get_state() and restored["it"].get_state() == {"next_index": 1}
    jckpt.verify(tmp_path)


def test_diff_says_whether_states_are_equal(tmp_path):
    it = iter(_dataset())
    rng = np.random.default_rng(1)
    for step in range(3):
        if step == 2:
            next(it)
        jckpt.save(tmp_path, {"it": it, "rng": rng, "w": np.ones(3)}, step=step)
    status = {s: {d.path: d.status for d in jckpt.diff(tmp_path, 0, s)} for s in (1, 2)}
    assert status[1] == {"it": "same", "rng": "same", "w": "same"}
    assert status[2] == {"it": "changed", "rng": "same", "w": "same"}
    jckpt.save(tmp_path, {"it": np.ones(2), "rng": random.Random(0), "w": np.ones(3)}, step=3)
    report = {d.path: d for d in jckpt.diff(tmp_path, 0, 3)}
    assert report["it"].status == "dtype" and report["it"].a == "host state (object) x1"
    assert report["rng"].status == "dtype" and report["w"].status == "same"


def test_cli_info_and_ls_count_host_states(tmp_path, capsys):
    jckpt.save(tmp_path, {"w": np.ones(3)}, step=0)
    jckpt.save(tmp_path, {"w": np.ones(3), "it": iter(_dataset()), "rng": np.random.default_rng(0)}, step=1)
    assert cli(["info", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["host_states"] == 2
    rows = {leaf["path"]: leaf for leaf in doc["leaves"]}
    assert rows["rng"]["storage"] == "host" and rows["rng"]["dtype"] == "numpy.random.Generator"
    assert rows["rng"]["chunks"] == 1  # one state per process
    assert cli(["info", str(tmp_path)]) == 0
    assert "2 host state(s)" in capsys.readouterr().out
    assert cli(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "host states" in lines[0]
    column = lines[0].index("host states")
    assert [line[column:].split()[0] for line in lines[2:4]] == ["0", "2"]


def test_export_skips_host_states_with_a_note(tmp_path):
    jckpt.save(tmp_path / "ckpt", {"w": np.arange(3.0), "it": iter(_dataset())}, step=0)
    with pytest.warns(UserWarning, match="host states are not tensors.*: it"):
        exported = jckpt.export(tmp_path / "ckpt", tmp_path / "out.npz", format="npz")
    assert exported.names == ["w"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imported = jckpt.import_from(tmp_path / "out.npz", tmp_path / "ckpt", step=1)
    assert imported.host_states == 0 and jckpt.restore(tmp_path / "ckpt", step=1)["w"].tolist() == [0, 1, 2]


def test_saving_an_empty_tree_or_a_graphdef_is_an_error(tmp_path):
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    with pytest.raises(ValueError, match="GraphDef has no leaves.*nnx.state"):
        jckpt.save(tmp_path, graphdef, step=0)
    for empty in ({}, [], {"a": {}, "b": []}):
        with pytest.raises(ValueError, match="nothing to save"):
            jckpt.save(tmp_path, empty, step=0)
    assert jckpt.all_steps(tmp_path) == []


def test_an_older_root_upgraded_by_a_save_holding_host_state_reads_everything(tmp_path):
    import pathlib
    import shutil

    root = tmp_path / "v3"
    shutil.copytree(pathlib.Path(__file__).parent / "fixtures" / "v3", root)
    state = jckpt.restore(root, step=2)
    state["it"] = iter(_dataset())
    next(state["it"])
    jckpt.save(root, state, step=3, kind="incremental")
    assert json.loads((root / fmt.ROOT_MARKER).read_bytes())["version"] == 4
    restored = jckpt.restore(root, step=3, like={**state, "it": iter(_dataset())})
    assert restored["it"].get_state() == {"next_index": 1}
    del state["it"], restored["it"]
    assert_trees_equal(restored, state)
    jckpt.verify(root)


def test_an_async_save_holds_the_state_of_maybe_save_not_of_later_draws(tmp_path, monkeypatch):
    """The background write is held until the loop has drawn the next batch: that batch is not in the save."""
    from jckpt import api

    release, real = __import__("threading").Event(), api.save_snapshot

    def held(*args, **kwargs):
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "save_snapshot", held)
    it, rng = iter(_dataset()), np.random.default_rng(0)
    with jckpt.CheckpointManager(tmp_path, async_save=True) as mngr:
        next(it), rng.random()
        assert mngr.maybe_save(1, {"it": it, "rng": rng, "w": np.ones(2)})
        after = (np.asarray(next(it)).tolist(), rng.random())  # drawn while the save is in flight
        release.set()
        mngr.wait()
        like = {"it": iter(_dataset()), "rng": np.random.default_rng(5), "w": np.ones(2)}
        restored = mngr.restore(like=like)
    assert (np.asarray(next(restored["it"])).tolist(), restored["rng"].random()) == after


def test_restore_or_init_sets_the_objects_init_returns(tmp_path):
    calls = []

    def init():
        calls.append(1)
        return {"w": jax.numpy.zeros(3), "it": iter(_dataset()), "rng": np.random.default_rng(0), "step": 0}

    with jckpt.CheckpointManager(tmp_path) as mngr:
        state, step = mngr.restore_or_init(init)
        assert step is None and len(calls) == 1
        for step in range(1, 4):
            next(state["it"]), state["rng"].random()
            state["w"] = state["w"] + 1
            mngr.maybe_save(step, {**state, "step": step})
        expected = (np.asarray(next(state["it"])).tolist(), state["rng"].random())
    calls.clear()
    with jckpt.CheckpointManager(tmp_path) as mngr:
        state, step = mngr.restore_or_init(init)
    assert step == 3 and state["step"] == 3 and state["w"].tolist() == [3, 3, 3]
    assert isinstance(state["w"], jax.Array)
    assert len(calls) == 2  # traced once (jax.eval_shape), called once for its live objects
    assert (np.asarray(next(state["it"])).tolist(), state["rng"].random()) == expected


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_host_states_on_object_stores_full_incremental_and_large(request, backend):
    """A 2 MiB state beside arrays, then an incremental save where only the iterator moved."""
    root = request.getfixturevalue(f"{backend}_root")
    big = BadState({"buffer": "x" * (2 * 2**20)})
    it, rng = iter(_dataset()), np.random.default_rng(0)
    state = {"w": np.arange(70_000, dtype=np.float32), "big": big, "it": it, "rng": rng}
    jckpt.save(root, state, step=1)
    next(it)
    info = jckpt.save(root, state, step=2, kind="incremental")
    assert info.bytes_written < 4096 and info.host_states == 3
    expected = (np.asarray(next(it)).tolist(), rng.random())
    jckpt.delete(root, 1)  # the reused state lives in step 1's data directory: kept for step 2
    like = {"w": np.zeros(70_000, np.float32), "big": BadState(None), "it": iter(_dataset()),
            "rng": np.random.default_rng(7)}  # fmt: skip
    restored = jckpt.restore(root, like=like)
    assert restored["big"].state == big.state
    assert (np.asarray(next(restored["it"])).tolist(), restored["rng"].random()) == expected
    jckpt.verify(root)


def test_import_from_orbax_brings_grain_iterator_items_as_host_states(tmp_path):
    """An Orbax CheckpointManager step with a PyTree item and Grain iterator items (Grain's handler)."""
    import shutil

    import orbax.checkpoint as ocp

    it, loader = iter(_dataset()), iter(_loader())
    for _ in range(3):
        next(it), next(loader)
    items = ("state", "data_iter", "loader")
    with ocp.CheckpointManager(tmp_path / "orbax", item_names=items) as mngr:
        mngr.save(5, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.arange(4.0)}),
            data_iter=grain.checkpoint.CheckpointSave(it),
            loader=grain.checkpoint.CheckpointSave(loader),
        ))  # fmt: skip
        mngr.wait_until_finished()
    expected = (np.asarray(next(it)).tolist(), np.asarray(next(loader)).tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = jckpt.import_from(tmp_path / "orbax" / "5", tmp_path / "ckpt", step=5)
    assert info.host_states == 2
    like = {"w": np.zeros(4), "data_iter": iter(_dataset()), "loader": iter(_loader())}  # one PyTree item
    restored = jckpt.restore(tmp_path / "ckpt", like=like)
    assert restored["w"].tolist() == [0, 1, 2, 3]
    assert tuple(np.asarray(next(restored[k])).tolist() for k in ("data_iter", "loader")) == expected

    two = tmp_path / "two"  # the same step as if written by 2 processes: not importable by one process
    shutil.copytree(tmp_path / "orbax" / "5", two)
    (two / "data_iter" / "process_0-of-1.json").rename(two / "data_iter" / "process_0-of-2.json")
    (two / "data_iter" / "process_1-of-2.json").write_text('{"next_index": 1}')
    with pytest.warns(UserWarning, match="data_iter .Grain iterator states of 2 processes"):
        info = jckpt.import_from(two, tmp_path / "ckpt", step=6)
    assert info.host_states == 1 and "data_iter" in info.metadata["skipped"][0]


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc, leaf: leaf["states"].append(list(leaf["states"][0])),  # process 0 twice
        lambda doc, leaf: leaf["states"].clear(),  # no state at all
        lambda doc, leaf: leaf["states"][0].__setitem__(3, 10**9),  # outside its blob
        lambda doc, leaf: leaf["states"][0].__setitem__(5, "pickle"),  # an unknown encoding
        lambda doc, leaf: leaf["extra"].__setitem__("host_type", "os.system"),  # an unknown kind
        lambda doc, leaf: doc.__setitem__("version", 3),  # host states in a version-3 manifest
    ],
)
def test_a_well_checksummed_manifest_with_bad_host_states_is_corruption(tmp_path, damage):
    jckpt.save(tmp_path, {"it": iter(_dataset()), "w": np.ones(3)}, step=2)
    path = tmp_path / fmt.manifest_key(2)
    doc = json.loads(path.read_bytes())
    damage(doc, next(leaf for leaf in doc["leaves"] if leaf["path"] == "it"))
    path.write_bytes(fmt.encode_document(doc))
    for call in (jckpt.restore, jckpt.verify, jckpt.metadata):
        with pytest.raises(jckpt.CorruptCheckpointError, match="step 2"):
            call(tmp_path)
