"""Lossless chunk compression on a really trained checkpoint: ratio, save/restore cost, speed per core.

Trains an MLP (64-1024-1024-10, ~1.1 M parameters) with Adam on scikit-learn's digits
for --steps steps, then saves params + Adam moments in float32 and cast to bfloat16
with each codec (``SaveOptions(compression=...)``; --codecs) and reports:

* the on-disk ratio (``bytes_total`` ÷ bytes of the data files);
* save and (warm) restore time relative to no compression, medians and ranges of
  --runs repetitions, the codecs' repetitions interleaved (order rotated each
  repetition), all threads, on the default disk (--dir);
* compression and decompression speed per core: a child process pinned to one
  CPU (``sched_setaffinity`` before anything starts a thread) saves and restores
  each dtype with each codec to tmpfs (/dev/shm: no disk), interleaved the same
  way; speed = uncompressed bytes ÷ (time with the codec − time without), the
  difference taken within each repetition, median over repetitions.

It also prints, per dtype, the bound of any byte-grouping coder without context modelling:
the order-0 entropy of each byte plane, per leaf (ZipNN's method: group the bytes of each
position, entropy-code each group).

Run:  python benchmarks/lossless_compression.py --steps 300 --runs 5 --codecs zstd,blosc,bytegroup
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if "--pin-cpu" in sys.argv:  # before jax/tensorstore start any thread: all of them inherit it
    os.sched_setaffinity(0, {int(sys.argv[sys.argv.index("--pin-cpu") + 1])})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jckpt  # noqa: E402


def train(steps: int) -> dict:
    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target)
    sizes = [64, 1024, 1024, 10]
    keys = jax.random.split(jax.random.key(0), len(sizes))
    params = {
        f"dense_{i}": {
            "kernel": jax.random.normal(keys[i], (m, n)) * jnp.sqrt(2.0 / m),
            "bias": jnp.zeros(n),
        }
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        h = xb
        for i in range(len(sizes) - 1):
            h = h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
            if i < len(sizes) - 2:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, yb).mean()

    @jax.jit
    def step(p, s, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.choice(len(x), 128, replace=False)
        params, opt_state, loss = step(params, opt_state, x[batch], y[batch])
    print(f"trained {steps} steps, final loss {float(loss):.4f}")
    return {"params": params, "opt_state": opt_state}


def _disk_bytes(root: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
        if f != "manifest.json" and not f.endswith(".json")
    )


def _rotated(items: list, rep: int) -> list:
    k = rep % len(items)
    return items[k:] + items[:k]


def measure_all(state: dict, codecs: list, runs: int, workdir: str) -> dict:
    """{codec: {"ratio", "save": [s], "restore": [s]}}, the codecs interleaved within each repetition."""
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    out = {c: {"ratio": 0.0, "save": [], "restore": []} for c in codecs}
    for rep in range(runs):
        for codec in _rotated(codecs, rep):
            options = jckpt.SaveOptions(compression=codec)
            root = tempfile.mkdtemp(dir=workdir)
            start = time.perf_counter()
            info = jckpt.save(root, state, step=0, options=options)
            out[codec]["save"].append(time.perf_counter() - start)
            out[codec]["ratio"] = info.bytes_total / _disk_bytes(root)
            start = time.perf_counter()
            jax.block_until_ready(jckpt.restore(root, like=like))
            out[codec]["restore"].append(time.perf_counter() - start)
            shutil.rmtree(root)
    return out


def _to_bf16(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        tree)


def per_core(npz: str, codecs: list, runs: int) -> dict:
    """In this (pinned, fresh) process: speeds per core; {dtype: {codec: (comp B/s, decomp B/s)}}."""
    data = np.load(npz)
    trained = {k: jnp.asarray(data[k]) for k in data.files}
    workdir = tempfile.mkdtemp(prefix="jckpt-codec-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    out = {}
    try:
        for dtype, state in (("float32", trained), ("bfloat16", _to_bf16(trained))):
            nbytes = sum(a.nbytes for a in jax.tree.leaves(state))
            measure_all(state, codecs, 1, workdir)  # warm-up
            res = measure_all(state, codecs, runs, workdir)
            out[dtype] = {}
            for c in codecs[1:]:
                comp = [b - a for a, b in zip(res[None]["save"], res[c]["save"])]
                decomp = [b - a for a, b in zip(res[None]["restore"], res[c]["restore"])]
                out[dtype][str(c)] = (nbytes / statistics.median(comp) if statistics.median(comp) > 0
                                      else None,
                                      nbytes / statistics.median(decomp)
                                      if statistics.median(decomp) > 0 else None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def _speed(x: float | None) -> str:
    return "   (<res)" if x is None else f"{x / 1e6:9.0f}"


def byte_planes(tree) -> tuple[list[float], float]:
    """Bits per byte of each byte plane (order-0 entropy, per leaf, little-endian), and the ratio bound."""
    floats = [np.asarray(a) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
    size = floats[0].dtype.itemsize
    bits = [0.0] * size
    total = 0
    for a in floats:
        planes = a.reshape(-1).view(np.uint8).reshape(-1, size)
        for i in range(size):
            p = np.bincount(planes[:, i], minlength=256) / len(planes)
            bits[i] += -(p[p > 0] * np.log2(p[p > 0])).sum() * len(planes)
        total += len(planes)
    bits = [b / total for b in bits]
    return bits, 8 * size / sum(bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--codecs", default="zstd,blosc",
                        help="comma-separated SaveOptions.compression values")
    parser.add_argument("--dir", default=None, help="where the timed saves go (default: a temp dir)")
    parser.add_argument("--per-core-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pin-cpu", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help="CPU the per-core child is pinned to "
                        "(default: the last one)")
    args = parser.parse_args()
    codecs = [None] + [c for c in args.codecs.split(",") if c]
    if args.per_core_worker:
        print(json.dumps(per_core(args.per_core_worker, codecs, args.runs)))
        return
    trained = train(args.steps)
    states = {"float32": trained, "bfloat16": _to_bf16(trained)}
    workdir = tempfile.mkdtemp(prefix="jckpt-compress-", dir=args.dir)
    load = os.getloadavg()[0]
    try:
        flat = {f"leaf_{i:03d}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(trained))}
        npz = os.path.join(workdir, "trained.npz")
        np.savez(npz, **flat)
        cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--pin-cpu", str(cpu), "--per-core-worker", npz,
             "--runs", str(args.runs), "--codecs", args.codecs],
            capture_output=True, text=True, timeout=3600)
        if child.returncode != 0:
            raise RuntimeError(child.stderr[-3000:])
        speeds = json.loads(child.stdout.strip().splitlines()[-1])
        results = {dtype: measure_all(state, codecs, args.runs, workdir) for dtype, state in states.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = statistics.median
    print(f"median (min-max) of {args.runs} repetitions, codecs interleaved; {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"MB/s/core: one pinned CPU, tmpfs, 1 MB = 1e6 bytes of uncompressed data")
    for dtype, state in states.items():
        bits, bound = byte_planes(state)
        print(f"{dtype}: byte planes (low to high) {', '.join(f'{b:.2f}' for b in bits)} bits/byte; "
              f"byte-grouping order-0 bound {bound:.3f}x")
    header = ("dtype", "codec", "ratio", "save s", "x none", "restore s", "x none",
              "comp MB/s/core", "decomp MB/s/core")
    print("{:9s} {:9s} {:>6s} {:>20s} {:>6s} {:>20s} {:>6s} {:>15s} {:>17s}".format(*header))
    for dtype, rows in results.items():
        base = rows[None]
        for codec, row in rows.items():
            sv, rs = row["save"], row["restore"]
            comp, decomp = speeds[dtype].get(str(codec), (None, None)) if codec else (None, None)
            print(
                f"{dtype:9s} {str(codec):9s} {row['ratio']:6.3f} "
                f"{med(sv):8.4f} ({min(sv):.3f}-{max(sv):.3f}) {med(sv) / med(base['save']):6.2f} "
                f"{med(rs):8.4f} ({min(rs):.3f}-{max(rs):.3f}) {med(rs) / med(base['restore']):6.2f} "
                f"{_speed(comp) if codec else '':>15s} {_speed(decomp) if codec else '':>17s}"
            )


if __name__ == "__main__":
    main()
