"""GPU check for issue 12: the device-to-host path of a save, on the same card, alternating.

jckpt.snapshot with ``snapshots.D2H_VIA`` = "direct" (copy_to_host_async + np.asarray into
fresh pageable memory) vs "pinned" (device_put to the pinned_host memory kind, aliased by
numpy) vs jax.device_get of the same arrays (5 alternating reps); then the manager's async
blocking per save and a sync jckpt.save with each path.

Usage (on the device): PYTHONPATH=$PWD python benchmarks/gpu_d2h.py   (N=60 arrays of 32 MiB)
Result on an NVIDIA H200: benchmarks/results/gpu-h200-d2h.txt.
"""
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jckpt
from jckpt import snapshots

N, SHAPE = int(os.environ.get("N", 60)), (8192, 1024) if jax.devices()[0].platform != "cpu" else (64, 64)
GIB = N * np.prod(SHAPE) * 4 / 2**30
print("devices", jax.devices(), f"state {GIB:.3f} GiB", flush=True)

def fresh(v):
    st = [jnp.full(SHAPE, float(v + k), jnp.float32) for k in range(N)]
    jax.block_until_ready(st)
    return st

st = fresh(0)
try:
    p = jax.device_put(st[0], st[0].sharding.with_memory_kind("pinned_host"))
    a = np.asarray(p)
    print("pinned_host np.asarray == values:", float(a[0, 0]) == 0.0, "aliases pinned buffer:",
          a.ctypes.data == p.addressable_shards[0].data.unsafe_buffer_pointer(), flush=True)
except Exception as e:
    print("pinned_host probe failed:", repr(e)[:300], flush=True)
del st
res = {"direct": [], "pinned": [], "device_get": []}
for rep in range(5):
    ways = list(res)[rep % 3:] + list(res)[: rep % 3]
    for way in ways:
        st = fresh(rep * 100 + 1)
        t = time.perf_counter()
        if way == "device_get":
            out = jax.device_get(st)
        else:
            snapshots.D2H_VIA = way
            out = jckpt.snapshot({"s": st})
        res[way].append(time.perf_counter() - t)
        if way != "device_get":
            assert float(out.leaves[N - 1].shards[0].data[5, 5]) == rep * 100 + 1 + N - 1
        del out, st
for k, v in res.items():
    m = statistics.median(v)
    print(f"D2H {k:10s} median {m:.3f} s  {GIB / m:6.1f} GiB/s  runs {[f'{x:.3f}' for x in v]}", flush=True)

root = tempfile.mkdtemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
for way in ("direct", "pinned", "direct", "pinned"):
    snapshots.D2H_VIA = way
    blocks = []
    directory = os.path.join(root, f"{way}-{time.time()}")
    with jckpt.CheckpointManager(directory, async_save=True) as m:
        for step in range(3):
            st = fresh(step * 7)
            t = time.perf_counter()
            m.save(step, {"s": st})
            blocks.append(time.perf_counter() - t)
            m.wait()
            del st
    st = fresh(3)
    t = time.perf_counter()
    jckpt.save(os.path.join(root, way + "sync" + str(time.time())), {"s": st}, step=0)
    sync = time.perf_counter() - t
    blocking = [f"{b:.3f}" for b in blocks]
    print(f"{way:7s} async blocking per save {blocking}  sync save {sync:.3f} s", flush=True)
print("done", flush=True)
