"""One process of a multi-process jckpt test (spawned by tests/test_multihost.py).

Usage: ``python tests/multihost_worker.py '<json args>'`` with args
``{"mode", "pid", "n", "port", "dir", "out", ...}``; ``n == 1`` runs a plain
process without ``jax.distributed``.  The environment (set by the parent)
gives JAX_PLATFORMS=cpu and two fake CPU devices per process.  Each process
writes its findings to ``<out>/<mode>_<pid>.json``; a failed check raises.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jckpt
from jckpt import multihost

CHUNK = jckpt.SaveOptions(chunk_bytes=32 * 2**10)  # several chunks per shard


# ---------------------------------------------------------------- the state


def global_values(seed: int = 0) -> dict[str, np.ndarray]:
    """The global value of every array leaf (the same on every process)."""
    rng = np.random.default_rng(seed)
    return {
        "params/w": rng.standard_normal((128, 256), dtype=np.float32),  # 128 KiB, sharded 2-d
        "params/b": rng.standard_normal((256,), dtype=np.float32),  # replicated, packed
        "params/emb": rng.standard_normal((64, 32)).astype(jax.numpy.bfloat16),  # sharded rows
        "params/big": rng.standard_normal((512, 160), dtype=np.float32),  # 320 KiB replicated
        "opt/mu": rng.standard_normal((128, 256), dtype=np.float32),
        "opt/count": np.array(seed + 7, np.int32),  # replicated scalar
        "rng": np.array([seed, 42], np.uint32),  # old-style key, replicated
    }


SPECS = {  # name -> PartitionSpec on a ("data", "model") mesh ("t": transposed layout)
    "params/w": {"": P("data", "model"), "t": P("model", "data")},
    "params/b": {"": P(), "t": P()},
    "params/emb": {"": P("data", None), "t": P(None, "model")},
    "params/big": {"": P(), "t": P("data", None)},
    "opt/mu": {"": P("data", "model"), "t": P("model", None)},
    "opt/count": {"": P(), "t": P()},
    "rng": {"": P(), "t": P()},
}


def mesh(shape: list[int]) -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))


def shardings(mesh_shape: list[int], layout: str = "") -> dict[str, NamedSharding]:
    m = mesh(mesh_shape)
    return {name: NamedSharding(m, spec[layout]) for name, spec in SPECS.items()}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def build(values: dict[str, np.ndarray], mesh_shape: list[int], layout: str = "") -> dict[str, Any]:
    """The train state as globally sharded jax arrays, plus a host leaf and a Python scalar."""
    arrays = {
        name: jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
        for (name, v), s in zip(values.items(), shardings(mesh_shape, layout).values())
    }
    state = nest(arrays)
    state["host"] = {"table": np.arange(12, dtype=np.int64).reshape(3, 4), "epoch": 3}
    return state


def like(values: dict[str, np.ndarray], mesh_shape: list[int], layout: str) -> dict[str, Any]:
    flat = {
        name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
        for (name, v), s in zip(values.items(), shardings(mesh_shape, layout).values())
    }
    state = nest(flat)
    state["host"] = {"table": np.zeros((3, 4), np.int64), "epoch": 0}
    return state


def flatten(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check(restored: dict[str, Any], values: dict[str, np.ndarray], shard_map: dict | None) -> int:
    """Asserts every addressable shard is bit-exact; returns the number of shards checked."""
    flat = flatten(restored)
    checked = 0
    for name, expected in values.items():
        got = flat[name]
        assert isinstance(got, jax.Array), (name, type(got))
        assert got.dtype == expected.dtype and got.shape == expected.shape, (name, got.dtype, got.shape)
        if shard_map is not None:
            assert got.sharding == shard_map[name], (name, got.sharding, shard_map[name])
        for shard in got.addressable_shards:
            want = expected[shard.index]
            have = np.asarray(shard.data)
            assert have.tobytes() == want.tobytes(), f"{name} shard {shard.index} differs"
            checked += 1
    assert flat["host/table"].tobytes() == np.arange(12, dtype=np.int64).tobytes()
    assert flat["host/epoch"] == 3 and type(flat["host/epoch"]) is int
    return checked


# ------------------------------------------------------------------- modes


def mode_save(a: dict) -> dict:
    """Saves the state (seed ``a["seed"]``) as step ``a["step"]`` on mesh ``a["mesh"]``."""
    values = global_values(a.get("seed", 0))
    state = build(values, a["mesh"], a.get("layout", ""))
    started = time.perf_counter()
    info = jckpt.save(a["dir"], state, step=a["step"], metrics={"loss": 0.5}, options=CHUNK)
    seconds = time.perf_counter() - started
    assert a["step"] in jckpt.all_steps(a["dir"])  # visible everywhere when save returns
    return {"info": info._asdict(), "seconds": seconds}


def mode_restore(a: dict) -> dict:
    """Restores step ``a["step"]`` onto each (mesh, layout) in ``a["targets"]``; checks bit-exactness."""
    values = global_values(a.get("seed", 0))
    out = {}
    for mesh_shape, layout in a["targets"]:
        restored = jckpt.restore(a["dir"], like(values, mesh_shape, layout), step=a["step"])
        out[f"{mesh_shape}{layout}"] = check(restored, values, shardings(mesh_shape, layout))
    if a.get("no_like"):
        plain = jckpt.restore(a["dir"], step=a["step"])  # default device, the whole arrays
        out["no_like"] = check(plain, values, None)
    return {"checked": out}


def mode_save_restore(a: dict) -> dict:
    return {**mode_save(a), **mode_restore(a)}


def mode_errors(a: dict) -> dict:
    """Errors raised on one process surface on every process, with their type."""
    values = global_values()
    state = build(values, a["mesh"])
    jckpt.save(a["dir"], state, step=1, options=CHUNK)
    seen = {}
    try:
        jckpt.save(a["dir"], state, step=1, options=CHUNK)  # process 0 finds it committed
    except jckpt.StepExistsError as e:
        seen["exists"] = str(e)
    mine = dict(state)
    if multihost.process_index() == 1:
        mine["extra"] = np.zeros(3)  # a different tree on one process only
    try:
        jckpt.save(a["dir"], mine, step=2, options=CHUNK)
    except jckpt.TreeMismatchError as e:
        seen["mismatch"] = str(e)
    try:
        jckpt.delete(a["dir"], 99)
    except jckpt.CheckpointNotFoundError as e:
        seen["delete"] = str(e)
    me = multihost.process_index()
    local = {"w": jax.numpy.full((300, 256), float(me))}  # process-local, differs: 300 KiB, not packed
    try:
        jckpt.save(a["dir"], local, step=3, options=CHUNK)
    except ValueError as e:
        seen["local"] = str(e)
    jckpt.save(a["dir"], state, step=2, options=CHUNK)  # the group is still usable
    same = {"w": jax.numpy.full((300, 256), 1.5)}  # process-local and equal everywhere: saved once
    jckpt.save(a["dir"], same, step=4, options=CHUNK)
    back = jckpt.restore(a["dir"], step=4)["w"]
    assert np.asarray(back).tobytes() == np.asarray(same["w"]).tobytes()
    seen["steps"] = jckpt.all_steps(a["dir"])
    return seen


def mode_crash(a: dict) -> dict:
    """Step 1 commits; during step 2 process ``a["victim"]`` is SIGKILLed by the parent."""
    values = global_values()
    state = build(values, a["mesh"])
    jckpt.save(a["dir"], state, step=1, options=CHUNK)
    me = multihost.process_index()
    if me == a["victim"]:
        from jckpt import write as saving

        real = saving.write_fragment

        def write_then_stall(*args, **kwargs):
            real(*args, **kwargs)  # its chunks are on disk; the fragment is never sent
            open(os.path.join(a["out"], "victim_wrote"), "w").close()
            time.sleep(600)  # the parent kills us here

        saving.write_fragment = write_then_stall
    multihost.set_timeout(a["short"])  # the bound the survivors must meet
    started = time.perf_counter()
    try:
        jckpt.save(a["dir"], build(global_values(1), a["mesh"]), step=2, options=CHUNK)
    except multihost.CoordinationTimeoutError as e:
        result = {
            "error": type(e).__name__,
            "is_timeout": isinstance(e, TimeoutError),
            "message": str(e),
            "step": e.step,
            "seconds": time.perf_counter() - started,
            "steps": jckpt.all_steps(a["dir"]),
        }
        write_result(a, result)
        os._exit(0)  # the group is broken: skip jax.distributed's shutdown barrier
    raise AssertionError("the save of step 2 did not fail")


def mode_incremental(a: dict) -> dict:
    """A full save, then an incremental one that rewrites only what changed; delete keeps it whole."""
    values = global_values()
    jckpt.save(a["dir"], build(values, a["mesh"]), step=0, options=CHUNK)
    changed = dict(values)
    changed["opt/mu"] = values["opt/mu"].copy()
    changed["opt/mu"][:8] += 1.0  # rows of one shard only
    changed["opt/count"] = np.array(8, np.int32)
    info = jckpt.save(a["dir"], build(changed, a["mesh"]), step=1, kind="incremental", options=CHUNK)
    jckpt.delete(a["dir"], 0)  # step 1 still references chunks written by step 0
    restored = jckpt.restore(a["dir"], like(changed, a["mesh"], ""), step=1)
    checked = check(restored, changed, shardings(a["mesh"]))
    jckpt.verify(a["dir"], 1)
    if multihost.is_primary():  # successful operations leave no keys in the coordination service
        assert multihost.client().key_value_dir_get_bytes("jckpt/") == []
    return {"info": info._asdict(), "checked": checked, "steps": jckpt.all_steps(a["dir"])}


def mode_manager(a: dict) -> dict:
    """CheckpointManager with async saves + keep_last across the group."""
    from jckpt import policy
    from jckpt.manager import CheckpointManager

    values = global_values()
    pol = policy.combine(policy.every_n_steps(2), policy.keep_last(2))
    saved = []
    with CheckpointManager(a["dir"], policy=pol, async_save=True) as mngr:
        for step in range(10):
            values["opt/count"] = np.array(step, np.int32)
            if mngr.maybe_save(step, build(values, a["mesh"]), metrics={"loss": 1.0 / (step + 1)}):
                saved.append(step)
        mngr.wait()
        kept = mngr.all_steps()
    values["opt/count"] = np.array(kept[-1], np.int32)
    restored = jckpt.restore(a["dir"], like(values, a["mesh"], "t"), step=kept[-1])
    checked = check(restored, values, shardings(a["mesh"], "t"))
    return {"saved": saved, "kept": kept, "on_disk": jckpt.all_steps(a["dir"]), "checked": checked}


def mode_manager_skewed_clocks(a: dict) -> dict:
    """A time-based policy with clocks that run at different rates per process: process 0 decides."""
    from jckpt import policy

    now = {"t": 0.0}
    rate = 4.0 if multihost.process_index() == 0 else 7.0  # seconds per step, different per host
    values = global_values()
    saved = []
    with jckpt.CheckpointManager(a["dir"], policy=policy.every_n_seconds(10), clock=lambda: now["t"]) as mngr:
        for step in range(10):
            now["t"] = step * rate
            if mngr.maybe_save(step, build(values, a["mesh"])):
                saved.append(step)
        mngr.wait()
    return {"saved": saved, "on_disk": jckpt.all_steps(a["dir"])}


def mode_agree(a: dict) -> dict:
    """Every process gets process 0's decision; the service's store does not grow."""
    me = multihost.process_index()
    decisions = [multihost.agree("decide", {"save": step % 3 == me % 3, "from": me}) for step in range(50)]
    multihost.barrier("agree-done")
    left = multihost.client().key_value_dir_get_bytes("jckpt/agree/") if me == 0 else []
    return {"decisions": decisions, "left": len(left)}


def mode_keys(a: dict) -> dict:
    """Typed PRNG keys, replicated and sharded across processes, restored into global shardings."""
    m = mesh(a["mesh"])
    keys = {"one": jax.random.key(3), "many": jax.random.split(jax.random.key(4), 8)}
    specs = {"one": P(), "many": P("data")}
    state = {}
    for name, k in keys.items():
        data = np.asarray(jax.random.key_data(k))
        state[name] = jax.make_array_from_callback(
            k.shape, NamedSharding(m, specs[name]), lambda idx, d=data: jax.random.wrap_key_data(d[idx])
        )
    jckpt.save(a["dir"], state, step=0)
    target = {
        n: jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=NamedSharding(m, specs[n]))
        for n, k in keys.items()
    }
    restored = jckpt.restore(a["dir"], target)
    for name, k in keys.items():
        data = np.asarray(jax.random.key_data(k))
        got = restored[name]
        assert got.dtype == k.dtype and got.sharding == target[name].sharding
        for shard in got.addressable_shards:
            assert np.asarray(jax.random.key_data(shard.data)).tobytes() == data[shard.index].tobytes()
    return {"ok": True}


def _shard(pid: int, n: int):
    """This process's iterator over its shard of a Grain dataset (every n-th example, as Grain shards)."""
    import grain

    return iter(grain.MapDataset.range(64).shuffle(seed=5)[pid::n].batch(2))


def _draw(it, rng) -> list:
    return [np.asarray(next(it)).tolist(), rng.random()]


def mode_host_state(a: dict) -> dict:
    """Each process at its own position in its own shard (and its own numpy Generator): step 1; then only
    process 1 moves: step 2 (incremental). Each restores its own of both; n == 1: restores a group's."""
    pid, n = jax.process_index(), jax.process_count()
    values = global_values()
    if n == 1:  # restore what a group of a["saved_by"] processes saved
        like_state = {"loader": _shard(0, 1), "noise": np.random.default_rng(0)}
        try:
            jckpt.restore(a["dir"], like=like_state, step=2)
        except ValueError as e:
            error = str(e)
        mapped = {}

        def furthest(path, states):  # a map_states: one process resumes at the largest saved position
            mapped[path] = states
            return [max(states, key=lambda s: s["next_index"]) if path == "loader" else states[0]]

        restored = jckpt.restore(a["dir"], like=like_state, step=2, map_states=furthest)
        return {"error": error, "mapped": mapped, "next_index": restored["loader"].get_state()["next_index"]}
    it, rng = _shard(pid, n), np.random.default_rng(100 + pid)
    for _ in range(2 + 3 * pid):
        _draw(it, rng)
    state = {**build(values, a["mesh"]), "loader": it, "noise": rng}
    jckpt.save(a["dir"], state, step=1, options=CHUNK)
    expected = {1: _draw(it, rng)}  # what each process draws next after step 1, then after step 2
    if pid == 0:  # process 0 did not move: its states are reused by step 2
        it, rng = _shard(pid, n), np.random.default_rng(100 + pid)
        for _ in range(2):
            _draw(it, rng)
    state = {**state, "loader": it, "noise": rng}
    info = jckpt.save(a["dir"], state, step=2, kind="incremental", options=CHUNK)
    expected[2] = _draw(it, rng)
    got = {}
    for step in (1, 2):
        like_state = like(values, a["mesh"], "")
        like_state.update(loader=_shard(pid, n), noise=np.random.default_rng(0))
        restored = jckpt.restore(a["dir"], like=like_state, step=step)
        check(restored, values, shardings(a["mesh"]))
        got[step] = _draw(restored["loader"], restored["noise"])
    assert got == expected, (got, expected)
    return {"draws": got, "info": info._asdict()}


MODES = {name[len("mode_") :]: fn for name, fn in globals().items() if name.startswith("mode_")}


# -------------------------------------------------------------------- main


def write_result(a: dict, result: dict) -> None:
    path = os.path.join(a["out"], f"{a['mode']}_{a['pid']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    a = json.loads(sys.argv[1])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if a["n"] > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{a['port']}",
            num_processes=a["n"],
            process_id=a["pid"],
            heartbeat_timeout_seconds=a.get("heartbeat", 100),
        )
    assert jax.process_index() == a["pid"] and jax.local_device_count() == 2
    write_result(a, MODES[a["mode"]](a))


if __name__ == "__main__":
    main()
