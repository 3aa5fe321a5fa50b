"""The GPU path: device-to-host snapshot, async blocking, save/restore vs Orbax, on one card.

Run on a machine with one accelerator (``python benchmarks/gpu.py``; ``--help``
for options); runs on CPU too (``--gib 0.02``) as a smoke test. Results and
the method are in docs/benchmarks.md ("GPU").

Method
------
* State: a transformer-like train state (params + Adam mu/nu, float32, plus
  two int32 counters) of about ``--gib`` GiB, built on the default device.
* Every repetition works on *fresh* device buffers (a jitted ``x + 1`` of the
  previous ones): a jax array caches its host copy after the first transfer,
  so re-reading the same array would time a memcpy, not the link.
* (1) Device-to-host copy: ``jckpt.snapshot(state)`` (what an async save
  blocks on) vs ``jax.device_get(state)`` of the same arrays, alternated, one
  untimed warm-up of each; ratio = device_get s ÷ snapshot s (target >= 0.8).
  Beside them, what the link and the host can do: ``jax.device_put`` to the
  ``pinned_host`` memory kind, and (where CuPy is installed) a CuPy copy of the
  same device buffers (DLPack, no copy) into pre-faulted pageable numpy buffers,
  into pinned buffers, and into fresh (not yet faulted) numpy buffers; and the
  host's own first-touch rate (``np.empty(n).fill`` on fresh pages vs again).
* (2) Async blocking: ``CheckpointManager(async_save=True)``, one
  ``maybe_save`` per repetition timed from the call to its return (the previous
  save is waited for, untimed, before it: the manager keeps one save in
  flight), paired with a ``jckpt.snapshot`` of other fresh buffers in the same
  repetition (order alternating); target: blocking <= snapshot + 10 ms. The
  background part (``wait()``) is reported too.
* (3) Save and restore of jckpt, Orbax with its defaults (``StandardCheckpointer``:
  OCDBT + zstd), Orbax with compression off (``PyTreeCheckpointHandler(
  use_compression=False)``, OCDBT) and a raw baseline (``jax.device_get`` + the
  same bytes as 16 MiB files written and fsynced by 16 threads; restore: 16
  threads read them into numpy buffers, then one ``jax.device_put``), in one
  process, contenders alternated (order rotated) per repetition, on local disk
  (``--dir``). Save is timed until durable, restore until the arrays are on the
  card (``block_until_ready``); warm = page cache holds the files, cold = after
  ``sync; echo 3 > /proc/sys/vm/drop_caches`` (skipped if not permitted).
  Restored arrays are compared with the saved ones on the card (untimed).
* (4) Resume: for each contender, a fresh process (after dropping the page
  cache) imports jax, initialises the backend, imports the library and
  restores onto the card; timed from spawn to the state on the card, split into
  start+imports and the restore call; contenders alternated, ``--resume-reps``.
* Medians and (min-max) of ``--reps`` repetitions; a deadline (``--budget``
  seconds) cuts repetitions short rather than losing the whole output.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jckpt  # noqa: E402

MiB, GiB = 2**20, 2**30
FILE_BYTES = 16 * MiB
THREADS = 16
T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


# --------------------------------------------------------------------------- state
def shapes_for(gib: float, d: int) -> dict:
    embed = (8 * d, d)
    per_layer = 12 * d * d + 9 * d  # q,k,v,o + mlp + biases/norms (floats)
    params_floats = gib * GiB / 4 / 3
    layers = max(1, int((params_floats - embed[0] * embed[1]) // per_layer))
    params = {"embed": embed}
    for i in range(layers):
        params[f"layer_{i:02d}"] = {
            "ln1": {"scale": (d,), "bias": (d,)},
            "attn": {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d)},
            "ln2": {"scale": (d,), "bias": (d,)},
            "mlp": {"w1": (d, 4 * d), "b1": (4 * d,), "w2": (4 * d, d), "b2": (d,)},
        }
    return {"step": (), "params": params, "opt_state": {"count": (), "mu": params, "nu": params}}


def build_state(gib: float, d: int):
    shapes = shapes_for(gib, d)
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_leaf)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    out = [jnp.asarray(7, jnp.int32) if s == () else jax.random.normal(k, s, jnp.float32)
           for k, s in zip(keys, leaves)]
    return jax.block_until_ready(jax.tree.unflatten(treedef, out))


_bump = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t))


def fresh(state):
    """New device buffers (the old ones' host caches must not serve the next copy)."""
    return jax.block_until_ready(_bump(state))


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


_equal = jax.jit(lambda a, b: jnp.all(jnp.stack(
    [jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])))


def check_equal(saved, restored) -> None:
    if not bool(_equal(saved, restored)):
        raise AssertionError("restored values differ from the saved ones")


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- contenders
class Jckpt:
    name = "jckpt"

    def save(self, path, state):
        jckpt.save(path, state, step=0)

    def restore(self, path, abstract):
        return jax.block_until_ready(jckpt.restore(path, like=abstract))

    def close(self):
        pass


class Orbax:
    """``compression=True``: StandardCheckpointer, Orbax's defaults (OCDBT + zstd)."""

    def __init__(self, compression: bool):
        import orbax.checkpoint as ocp

        self.ocp, self.compression = ocp, compression
        self.name = "orbax" if compression else "orbax-nc"
        if compression:
            self.ckptr = ocp.StandardCheckpointer()
        else:
            self.ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_compression=False))

    def save(self, path, state):
        if self.compression:
            self.ckptr.save(path, state)
        else:
            self.ckptr.save(path, args=self.ocp.args.PyTreeSave(state))
        self.ckptr.wait_until_finished()

    def restore(self, path, abstract):
        if self.compression:
            out = self.ckptr.restore(path, abstract)
        else:
            restore_args = self.ocp.checkpoint_utils.construct_restore_args(abstract)
            out = self.ckptr.restore(
                path, args=self.ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
        return jax.block_until_ready(out)

    def close(self):
        self.ckptr.close()


def _pieces(buffers: list[np.ndarray]) -> list[list[memoryview]]:
    """The concatenated bytes of ``buffers`` cut into FILE_BYTES files (as memoryview lists)."""
    files, cur, size = [], [], 0
    for b in buffers:
        mv = memoryview(np.ascontiguousarray(b).reshape(-1).view(np.uint8))
        pos = 0
        while pos < len(mv):
            take = min(len(mv) - pos, FILE_BYTES - size)
            cur.append(mv[pos:pos + take])
            pos, size = pos + take, size + take
            if size == FILE_BYTES:
                files.append(cur)
                cur, size = [], 0
    if cur:
        files.append(cur)
    return files


def _io_all(fn, fd, views) -> None:
    """``os.pwritev``/``os.preadv`` of every view, in batches under IOV_MAX, resuming short transfers."""
    offset = 0
    for start in range(0, len(views), 512):
        batch = list(views[start:start + 512])
        while batch:
            done = fn(fd, batch, offset)
            if done <= 0:
                raise OSError(f"short transfer at offset {offset}")
            offset += done
            while batch and done >= len(batch[0]):
                done -= len(batch[0])
                batch.pop(0)
            if done:
                batch[0] = batch[0][done:]


class Raw:
    """device_get, then 16 threads write+fsync 16 MiB files; restore reads them back + device_put."""

    name = "raw16"

    def save(self, path, state):
        host = jax.device_get(jax.tree.leaves(state))
        os.makedirs(path)

        def write(i_views):
            i, views = i_views
            fd = os.open(os.path.join(path, f"{i:05d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _io_all(os.pwritev, fd, views)
                os.fsync(fd)
            finally:
                os.close(fd)

        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(write, enumerate(_pieces(host))))
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    def restore(self, path, abstract):
        leaves, treedef = jax.tree.flatten(abstract)
        bufs = [np.empty(x.shape, x.dtype) for x in leaves]

        def read(i_views):
            i, views = i_views
            fd = os.open(os.path.join(path, f"{i:05d}"), os.O_RDONLY)
            try:
                _io_all(os.preadv, fd, views)
            finally:
                os.close(fd)

        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(read, enumerate(_pieces(bufs))))
        dev = jax.device_put(bufs, [x.sharding for x in leaves])
        return jax.block_until_ready(jax.tree.unflatten(treedef, dev))

    def close(self):
        pass


# --------------------------------------------------------------------------- parts
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def span(xs):
    return f"{min(xs):.3f}-{max(xs):.3f}" if xs else "-"


def part_copy(state, reps, deadline):
    """(1) jckpt.snapshot vs jax.device_get (and the pinned_host memory kind) of the same bytes."""
    dev = jax.tree.leaves(state)[0].sharding
    pinned = None
    try:
        pinned = jax.tree.map(lambda x: x.sharding.with_memory_kind("pinned_host"), state)
        jax.block_until_ready(jax.device_put(fresh(state), pinned))
    except Exception as e:  # noqa: BLE001
        log(f"pinned_host memory kind not usable: {e!r}"[:300])
        pinned = None
    ways = {
        "snapshot": lambda s: jckpt.snapshot(s),
        "device_get": lambda s: jax.device_get(s),
    }
    if pinned is not None and dev.memory_kind != "pinned_host":
        ways["pinned_host"] = lambda s: jax.block_until_ready(jax.device_put(s, pinned))
    times = {n: [] for n in ways}
    for fn in ways.values():  # untimed warm-up of each
        state = fresh(state)
        fn(state)
    names = list(ways)
    for rep in range(reps):
        if time.perf_counter() > deadline:
            break
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            state = fresh(state)
            t = time.perf_counter()
            out = ways[name](state)
            times[name].append(time.perf_counter() - t)
            del out
        log(f"copy rep {rep}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in times.items()))
    return state, times


def part_link(state, reps):
    """What the host and the link can do: first-touch rate; CuPy D2H into pre-faulted/pinned/fresh buffers."""
    out = {}
    size = nbytes(state)
    for _ in range(reps):
        t = time.perf_counter()
        a = np.empty(size, np.uint8)
        a.fill(1)
        t1 = time.perf_counter()
        a.fill(2)
        t2 = time.perf_counter()
        out.setdefault("host: first touch + fill", []).append(t1 - t)
        out.setdefault("host: fill, pages present", []).append(t2 - t1)
        del a
    try:
        import cupy as cp
        import cupyx
    except ImportError:
        log("CuPy not installed: no link-limit rows")
        return state, out
    if jax.tree.leaves(state)[0].devices().pop().platform != "gpu":
        return state, out
    try:
        state = _cupy_link(state, reps, out, cp, cupyx)
    except Exception:  # noqa: BLE001  (keep the host rows)
        log(f"CuPy copies failed\n{traceback.format_exc()}")
    return state, out


def _cupy_link(state, reps, out, cp, cupyx):
    leaves = jax.tree.leaves(state)
    paged = [np.empty(x.shape, x.dtype) for x in leaves]
    pinned = [cupyx.empty_pinned(x.shape, x.dtype) for x in leaves]
    for b in paged + pinned:
        b.fill(0)
    stream = cp.cuda.Stream(non_blocking=True)

    def copy(bufs):
        src = [cp.from_dlpack(x) for x in leaves]
        t = time.perf_counter()
        for x, b in zip(src, bufs):
            x.get(stream=stream, out=b, blocking=False)
        stream.synchronize()
        return time.perf_counter() - t

    for rep in range(reps + 1):
        state = fresh(state)
        leaves = jax.tree.leaves(state)
        r = {"cupy D2H: pinned buffers": copy(pinned),
             "cupy D2H: pageable, pre-faulted": copy(paged),
             "cupy D2H: fresh numpy buffers": copy([np.empty(x.shape, x.dtype) for x in leaves])}
        if rep:  # the first is a warm-up
            for k, v in r.items():
                out.setdefault(k, []).append(v)
    log("link: " + ", ".join(f"{k} {med(v):.3f}s" for k, v in out.items()))
    return state


def part_async(state, reps, root, deadline):
    """(2) blocking time of CheckpointManager.maybe_save (async), paired with a jckpt.snapshot."""
    from jckpt import policy as P

    blocking, background, snaps = [], [], []
    mngr = jckpt.CheckpointManager(root, policy=P.combine(P.every_n_steps(1), P.keep_last(1)),
                                   async_save=True)
    try:
        for rep in range(reps + 1):  # the first is an untimed warm-up
            if time.perf_counter() > deadline:
                break
            times = {}
            for what in ("snapshot", "save") if rep % 2 else ("save", "snapshot"):
                state = fresh(state)
                mngr.wait()
                t = time.perf_counter()
                if what == "save":
                    assert mngr.maybe_save(rep, state)
                    times["save"] = time.perf_counter() - t
                    mngr.wait()
                    times["wait"] = time.perf_counter() - t - times["save"]
                else:
                    snap = jckpt.snapshot(state)
                    times["snapshot"] = time.perf_counter() - t
                    del snap
            if rep:
                blocking.append(times["save"])
                background.append(times["wait"])
                snaps.append(times["snapshot"])
                log(f"async rep {rep}: blocking {times['save'] * 1e3:.1f} ms, snapshot "
                    f"{times['snapshot'] * 1e3:.1f} ms, background {times['wait']:.3f}s")
    finally:
        mngr.close()
    return state, blocking, background, snaps


def part_save_restore(state, reps, base, deadline, names):
    makers = {"jckpt": Jckpt, "orbax": lambda: Orbax(True), "orbax-nc": lambda: Orbax(False),
              "raw16": Raw}
    impls = {}
    for n in names:
        try:
            impls[n] = makers[n]()
        except Exception:  # noqa: BLE001  (e.g. Orbax missing: report the others)
            log(f"{n}: cannot set up\n{traceback.format_exc()}")
    abstract = abstract_of(state)
    # untimed warm-up of each contender on a tiny tree
    tiny = {"w": jnp.ones((64, 64)), "b": jnp.zeros(3)}
    for n, impl in list(impls.items()):
        p = os.path.join(base, f"warm-{n}")
        try:
            impl.save(p, tiny)
            impl.restore(p, abstract_of(tiny))
        except Exception:  # noqa: BLE001
            log(f"{n}: warm-up failed, dropped\n{traceback.format_exc()}")
            del impls[n]
        shutil.rmtree(p, ignore_errors=True)
    res = {n: {"save": [], "warm": [], "cold": []} for n in impls}
    can_drop = True
    order = list(impls)
    for rep in range(reps):
        if time.perf_counter() > deadline:
            log("deadline reached, stopping save/restore repetitions")
            break
        k = rep % len(order)
        for n in order[k:] + order[:k]:
            impl, path = impls[n], os.path.join(base, f"{n}-{rep}")
            state = fresh(state)
            os.sync()
            t = time.perf_counter()
            impl.save(path, state)
            res[n]["save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            out = impl.restore(path, abstract)
            res[n]["warm"].append(time.perf_counter() - t)
            check_equal(state, out)
            del out
            if can_drop and (can_drop := drop_caches()):
                t = time.perf_counter()
                out = impl.restore(path, abstract)
                res[n]["cold"].append(time.perf_counter() - t)
                check_equal(state, out)
                del out
            shutil.rmtree(path, ignore_errors=True)
            r = res[n]
            log(f"rep {rep} {n:8s} save {r['save'][-1]:.3f}s warm {r['warm'][-1]:.3f}s "
                f"cold {r['cold'][-1] if r['cold'] else float('nan'):.3f}s")
    for impl in impls.values():
        impl.close()
    return state, res, can_drop


def resume_worker(name: str, path: str, gib: float, d: int) -> None:
    """In a fresh process: backend init + imports, then a restore onto the card; prints stamps."""
    jax.devices()  # the backend (CUDA) starts here, as in any training job
    impl = {"jckpt": Jckpt, "orbax": lambda: Orbax(True), "orbax-nc": lambda: Orbax(False),
            "raw16": Raw}[name]()
    t_imported = time.time()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, np.int32 if s == () else np.float32, sharding=sharding),
        shapes_for(gib, d), is_leaf=lambda x: isinstance(x, tuple))
    out = impl.restore(path, abstract)
    t_done = time.time()
    total = float(sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out)))
    print("RESUME", t_imported, t_done, total, flush=True)


def part_resume(state, names, reps, base, args, deadline):
    """(4) a fresh process per restore, cold page cache, spawn -> state on the card."""
    makers = {"jckpt": Jckpt, "orbax": lambda: Orbax(True), "orbax-nc": lambda: Orbax(False),
              "raw16": Raw}
    paths, expected = {}, float(sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(state)))
    for n in names:
        paths[n] = os.path.join(base, f"resume-{n}")
        impl = makers[n]()
        impl.save(paths[n], state)
        impl.close()
    res = {n: {"total": [], "imports": [], "call": []} for n in names}
    for rep in range(reps):
        if time.perf_counter() > deadline:
            log("deadline reached, stopping resume repetitions")
            break
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            if not drop_caches():
                log("cannot drop the page cache: no resume rows")
                return res
            cmd = [sys.executable, os.path.abspath(__file__), "--resume-worker", n, "--path", paths[n],
                   "--gib", str(args.gib), "--d", str(args.d)]
            t_spawn = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESUME ")]
            if proc.returncode != 0 or not line:
                log(f"resume {n} failed: {proc.stderr[-2000:]}")
                continue
            _, t_imp, t_done, total = line[-1].split()
            if abs(float(total) - expected) > 1e-3 * max(1.0, abs(expected)):
                log(f"resume {n}: checksum {total} differs from the saved {expected}")
            r = res[n]
            r["total"].append(float(t_done) - t_spawn)
            r["imports"].append(float(t_imp) - t_spawn)
            r["call"].append(float(t_done) - float(t_imp))
            log(f"resume rep {rep} {n:8s} total {r['total'][-1]:.3f}s = start+imports "
                f"{r['imports'][-1]:.3f}s + restore {r['call'][-1]:.3f}s")
    return res


# --------------------------------------------------------------------------- main
def describe_device() -> str:
    dev = jax.devices()[0]
    text = f"jax {jax.__version__}, {jax.device_count()} device(s): {dev.platform} {dev.device_kind}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            text += f"; nvidia-smi: {smi.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in ("jaxlib", "tensorstore", "orbax-checkpoint", "numpy"):
        try:
            out.append(f"{p} {version(p)}")
        except PackageNotFoundError:
            out.append(f"{p} -")
    return ", ".join(out) + f"; python {sys.version.split()[0]}; {os.cpu_count()} CPUs"


def _rate_row(label: str, xs: list, size: int) -> str:
    return f"| {label} | {med(xs):.3f} s ({span(xs)}) | {size / GiB / med(xs):.1f} GiB/s |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="train-state size in GiB (default 2)")
    ap.add_argument("--d", type=int, default=1024, help="model width (default 1024)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of (1) and (2) (default 5)")
    ap.add_argument("--sr-reps", type=int, default=3, help="repetitions of (3) (default 3)")
    ap.add_argument("--resume-reps", type=int, default=2, help="repetitions of (4) (default 2; 0: skip)")
    ap.add_argument("--contenders", default="jckpt,orbax,orbax-nc,raw16")
    ap.add_argument("--dir", default=None, help="local scratch directory (default: a temp dir)")
    ap.add_argument("--budget", type=float, default=330, help="seconds before reps are cut short")
    ap.add_argument("--resume-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.resume_worker:
        resume_worker(args.resume_worker, args.path, args.gib, args.d)
        return 0
    deadline = T0 + args.budget

    log(describe_device())
    log(versions())
    state = build_state(args.gib, args.d)
    size = nbytes(state)
    log(f"state: {len(jax.tree.leaves(state))} leaves, {size / GiB:.3f} GiB on "
        f"{jax.tree.leaves(state)[-1].devices()}")
    base = tempfile.mkdtemp(prefix="jckpt-gpu-", dir=args.dir)
    summary: list[str] = []
    names = [n for n in args.contenders.split(",") if n]
    try:
        try:
            state, times = part_copy(state, args.reps, deadline)
            s, g = times["snapshot"], times["device_get"]
            ratios = [b / a for a, b in zip(s, g)]
            summary += [_rate_row("(1) jckpt.snapshot (D2H)", s, size),
                        _rate_row("(1) jax.device_get (D2H)", g, size)]
            if times.get("pinned_host"):
                summary.append(_rate_row("(1) jax.device_put to pinned_host", times["pinned_host"], size))
            summary.append(f"| **(1) copy ratio device_get ÷ snapshot** (target ≥ 0.8) | "
                           f"**{med(ratios):.2f}** ({span(ratios)}) | |")
        except Exception:  # noqa: BLE001
            log(f"(1) failed\n{traceback.format_exc()}")
        try:
            state, link = part_link(state, 3)
            summary += [_rate_row(f"(1) {k}", v, size) for k, v in link.items()]
        except Exception:  # noqa: BLE001
            log(f"(1b) failed\n{traceback.format_exc()}")
        try:
            state, blocking, background, snaps = part_async(state, args.reps, os.path.join(base, "mngr"),
                                                            deadline)
            if blocking:
                extra = [(b - c) * 1e3 for b, c in zip(blocking, snaps)]
                summary += [
                    f"| (2) async maybe_save blocking | {med(blocking) * 1e3:.1f} ms "
                    f"({span(blocking)} s) | |",
                    f"| (2) jckpt.snapshot, same repetitions | {med(snaps) * 1e3:.1f} ms "
                    f"({span(snaps)} s) | |",
                    f"| **(2) blocking − snapshot, paired** (target ≤ 10 ms) | "
                    f"**{med(extra):.1f} ms** ({min(extra):.1f} to {max(extra):.1f}) | |",
                    f"| (2) async background (hash+write+commit) | {med(background):.3f} s "
                    f"({span(background)}) | |",
                ]
        except Exception:  # noqa: BLE001
            log(f"(2) failed\n{traceback.format_exc()}")
        try:
            state, res, cold = part_save_restore(state, args.sr_reps, base, deadline, names)
            for n, r in res.items():
                summary.append(
                    f"| (3) {n} save / warm restore / cold restore | {med(r['save']):.3f} / "
                    f"{med(r['warm']):.3f} / {med(r['cold']):.3f} s | save ({span(r['save'])}), warm "
                    f"({span(r['warm'])}), cold ({span(r['cold'])}) |")
            if "jckpt" in res:
                j = res["jckpt"]
                for other in (n for n in res if n != "jckpt"):
                    o = res[other]
                    cells = []
                    for ph in ("save", "warm", "cold"):
                        pr = [b / a for a, b in zip(j[ph], o[ph])]
                        cells.append(f"{ph} {med(o[ph]) / med(j[ph]):.2f}× ({span(pr)})"
                                     if pr else f"{ph} -")
                    summary.append(f"| (3) {other} s ÷ jckpt s | {', '.join(cells)} | |")
            if not cold:
                summary.append("| (cold restores skipped: drop_caches not permitted) | | |")
        except Exception:  # noqa: BLE001
            log(f"(3) failed\n{traceback.format_exc()}")
        if args.resume_reps:
            try:
                res = part_resume(state, names, args.resume_reps, base, args, deadline + 60)
                for n, r in res.items():
                    if r["total"]:
                        summary.append(
                            f"| (4) {n} resume: total = start+imports + restore | {med(r['total']):.3f} = "
                            f"{med(r['imports']):.3f} + {med(r['call']):.3f} s | total ({span(r['total'])}), "
                            f"restore ({span(r['call'])}) |")
                if res.get("jckpt", {}).get("total"):
                    j = res["jckpt"]
                    for other in (n for n in res if n != "jckpt" and res[n]["total"]):
                        o = res[other]
                        summary.append(
                            f"| (4) {other} s ÷ jckpt s, resume | "
                            f"total {med(o['total']) / med(j['total']):.2f}×, "
                            f"restore call {med(o['call']) / med(j['call']):.2f}× | |")
            except Exception:  # noqa: BLE001
                log(f"(4) failed\n{traceback.format_exc()}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n## GPU path — {describe_device()}\n{versions()}; state {size / GiB:.3f} GiB, "
          f"{len(jax.tree.leaves(state))} leaves; medians (min-max)\n")
    print("| measure | median (range) | |\n|---|---|---|")
    print("\n".join(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
