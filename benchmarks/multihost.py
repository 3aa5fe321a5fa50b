"""Multi-host benchmark: aggregate save/restore throughput with 1, 2, 4 processes; coordination overhead.

Run ``python benchmarks/multihost.py`` (``--help`` for options).  Results and
the method are in docs/multihost.md.

Method
------
* Every measurement is a fresh group of N local processes (``jax.distributed``
  on 127.0.0.1, 2 fake CPU devices each, gloo).  The same *total* state (float32
  leaves sharded along their first axis over all 2N devices) is split over the
  group, so each process holds and writes 1/N of it.  Group sizes are
  interleaved run by run (order rotated), and the table shows medians.
* Save: a barrier, then ``jckpt.save`` on every process; the time is the
  slowest process's (save returns after the commit and the final barrier, so
  they are within a millisecond).  Restore: ``jckpt.restore`` into the same
  shardings, blocked on, warm (page cache; after one untimed restore) and cold (after
  ``echo 3 > /proc/sys/vm/drop_caches`` by process 0 between two barriers;
  skipped without root).  Throughput = state bytes / time.
* Coordination: a ~200-leaf state (params + Adam moments of a small MLP
  stack, 2.3 MiB) saved 10 times; every call jckpt makes to the coordination
  service (key-value set/get, barrier) is timed on each process.  The no-op
  protocol is :class:`jckpt.multihost.Operation` with empty work: the pure
  round trips a save adds (prepare broadcast, fragment gather, verdict, final
  barrier).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

MIB = 2**20


# ------------------------------------------------------------------ worker


def _timed_client() -> dict[str, list[float]]:
    """Wraps the coordination calls jckpt makes so each one's duration is recorded."""
    from jckpt import multihost

    spent: dict[str, list[float]] = {"calls": []}
    for name in ("_put", "_get", "barrier"):
        real = getattr(multihost, name)

        def timed(*args, _real=real, **kwargs):
            t = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                spent["calls"].append(time.perf_counter() - t)

        setattr(multihost, name, timed)
    return spent


def _state(total_bytes: int, leaves: int, devices: list, seed: int = 0) -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    cols = 1024
    rows = max(8, (total_bytes // leaves // 4 // cols) // 8 * 8)

    def leaf(i):
        def fill(index):
            start = index[0].start or 0
            rng = np.random.default_rng((seed, i, start))
            n = (index[0].stop or rows) - start
            return rng.standard_normal((n, cols), dtype=np.float32)

        return jax.make_array_from_callback((rows, cols), sharding, fill)

    return {f"layer{i:03d}": {"w": leaf(i)} for i in range(leaves)}


def _small_state(devices: list) -> dict:
    """~200 leaves: 33 layers x (kernel, bias) x (param, mu, nu), plus a step; ~2.3 MiB."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(devices), ("d",))
    sharded, replicated = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    rng = np.random.default_rng(0)

    def arr(shape, sharding):
        value = rng.standard_normal(shape, dtype=np.float32)
        return jax.make_array_from_callback(shape, sharding, lambda idx: value[idx])

    def layers():
        return {
            f"l{i:02d}": {"kernel": arr((64, 96), sharded), "bias": arr((96,), replicated)} for i in range(33)
        }

    return {"params": layers(), "mu": layers(), "nu": layers(), "step": np.int64(0)}


def worker(a: dict) -> dict:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if a["n"] > 1:
        jax.distributed.initialize(f"127.0.0.1:{a['port']}", a["n"], a["pid"])
    import jckpt
    from jckpt import multihost

    devices = jax.devices()
    out: dict = {}
    root = a["dir"]
    warm = _small_state(devices)
    jckpt.save(os.path.join(root, "warmup"), warm, step=0)  # imports, contexts, jit of the callbacks
    jax.block_until_ready(jckpt.restore(os.path.join(root, "warmup"), warm, step=0))

    if a["total_mib"]:
        state = _state(a["total_mib"] * MIB, a["leaves"], devices)
        jax.block_until_ready(state)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        multihost.barrier("bench/save")
        t = time.perf_counter()
        jckpt.save(os.path.join(root, "big"), state, step=1)
        out["save_s"] = time.perf_counter() - t
        del state
        jax.block_until_ready(jckpt.restore(os.path.join(root, "big"), like, step=1))  # first-call costs
        multihost.barrier("bench/warm")
        t = time.perf_counter()
        jax.block_until_ready(jckpt.restore(os.path.join(root, "big"), like, step=1))
        out["restore_warm_s"] = time.perf_counter() - t
        if a["cold"]:
            multihost.barrier("bench/drop")
            if multihost.is_primary():
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            multihost.barrier("bench/cold")
            t = time.perf_counter()
            jax.block_until_ready(jckpt.restore(os.path.join(root, "big"), like, step=1))
            out["restore_cold_s"] = time.perf_counter() - t
        out["bytes"] = nbytes

    if a["coordination"]:
        small = _small_state(devices)
        out["leaves"] = len(jax.tree.leaves(small))
        spent = _timed_client()
        saves, coord = [], []
        for step in range(1, 11):
            spent["calls"].clear()
            multihost.barrier(f"bench/small/{step}")
            t = time.perf_counter()
            jckpt.save(os.path.join(root, "small"), small, step=step)
            saves.append(time.perf_counter() - t)
            coord.append(sum(spent["calls"]))
        out["small_save_s"], out["small_coord_s"] = saves, coord
        noop = []
        for i in range(20):
            t = time.perf_counter()
            op = multihost.Operation("bench", root, i)
            op.on_primary("prepare", lambda: ["x", None])
            op.all_then_primary("write", lambda: {}, lambda fragments: {}, lambda: None)
            noop.append(time.perf_counter() - t)
        out["noop_s"] = noop
    return out


# ------------------------------------------------------------------ parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(n: int, args: argparse.Namespace, cold: bool, coordination: bool) -> list[dict]:
    directory = tempfile.mkdtemp(prefix=f"jckpt-mh{n}-", dir=args.dir)
    port = _free_port()
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONUNBUFFERED="1",
    )
    procs = []
    for pid in range(n):
        spec = dict(
            pid=pid,
            n=n,
            port=port,
            dir=directory,
            total_mib=args.total_mib,
            leaves=args.leaves,
            cold=cold,
            coordination=coordination,
        )
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(directory, ignore_errors=True)
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a process of the {n}-process group failed: {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4", help="group sizes (default 1,2,4)")
    parser.add_argument(
        "--total-mib", type=int, default=512, help="total state size (default 512 MiB; 0: coordination only)"
    )
    parser.add_argument("--leaves", type=int, default=64, help="leaves of the big state (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="runs per group size (medians; default 3)")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: temp dir)")
    parser.add_argument("--no-cold", action="store_true", help="skip cold restores (need root)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sizes = [int(s) for s in args.processes.split(",")]
    cold = not args.no_cold and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    results: dict[int, list[list[dict]]] = {n: [] for n in sizes}
    for run in range(args.runs):
        order = sizes[run % len(sizes) :] + sizes[: run % len(sizes)]
        for n in order:
            results[n].append(run_group(n, args, cold, coordination=True))
            print(f"run {run + 1}/{args.runs}: {n} process(es) done", file=sys.stderr)

    if args.total_mib:
        _throughput_table(results, sizes, args)
    _coordination_table(results, sizes)


def _throughput_table(results: dict, sizes: list[int], args: argparse.Namespace) -> None:
    med = statistics.median
    total = results[sizes[0]][0][0]["bytes"]
    print(
        f"\nSame total state ({total / MIB:.0f} MiB, {args.leaves} float32 leaves), medians of {args.runs}.\n"
    )
    print("| processes | save GB/s | restore warm GB/s | restore cold GB/s | save | warm | cold (vs 1) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    keys = ("save_s", "restore_warm_s", "restore_cold_s")
    base: dict[str, float] = {}
    for n in sizes:
        row = {}
        for key in keys:
            per_run = [max(p[key] for p in group) for group in results[n] if key in group[0]]
            row[key] = total / med(per_run) / 1e9 if per_run else float("nan")
        base = base or row
        cells = [f"{row[k]:.2f}" for k in keys] + [f"{row[k] / base[k]:.2f}x" for k in keys]
        print(f"| {n} | " + " | ".join(cells) + " |")


def _coordination_table(results: dict, sizes: list[int]) -> None:
    med = statistics.median
    leaves = results[sizes[0]][0][0]["leaves"]
    print(f"\nCoordination: a state of {leaves} leaves (2.3 MiB), 10 saves per run; medians, ms.\n")
    print("| processes | save | in coordination calls, process 0 | ... slowest process | no-op protocol |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        groups = results[n]
        saves = [max(p["small_save_s"][i] for p in g) for g in groups for i in range(10)]
        coord_p0 = [g[0]["small_coord_s"][i] for g in groups for i in range(10)]
        coord_worst = [max(p["small_coord_s"][i] for p in g) for g in groups for i in range(10)]
        noop = [max(p["noop_s"][i] for p in g) for g in groups for i in range(20)]
        cells = [med(x) * 1e3 for x in (saves, coord_p0, coord_worst, noop)]
        print(f"| {n} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
