"""Delta encoding of dense fine-tuning saves (issue 12 §3): XOR with the base, byte grouping, entropy coding.

Question: in dense fine-tuning every chunk changes a little, so chunk-level incremental saves
write everything.  Would storing ``new XOR base`` per chunk, byte-grouped and entropy-coded,
save >= 25% of the bytes at <= 1.2x the time of a plain full save?  (Restore then reads the
base and the delta: one extra read per chain link, so a full save every k bounds the chain.)

States: the CNN of benchmarks/incremental.py (``cnn_finetune``: 2 conv + 2 dense, every
parameter trained by optax Adam on scikit-learn's digits), trained --warmup steps, then the
base is taken and trained --steps more (each value in turn, continuing from the previous
state).  Float32, and the same two states cast to bfloat16.  Groups: params, Adam mu, Adam nu,
and the whole train state ("all": params + opt_state + step).

Encoding (no change to jckpt): per leaf, the new array's bits XOR the base's bits (numpy, as
unsigned integers of the same width), then the XOR tree is saved by ``jckpt.save`` with
``SaveOptions(compression="bytegroup")`` -- jckpt's own chunk shapes and packing, blosc byte
shuffle (the byte grouping) + zstd 1 per 1 MiB block (the entropy coding), its writer threads
and its fsync.  The base is assumed held in host memory (a copy of the previous save).

* Bytes: stored data bytes (files other than *.json) of the delta save, ÷ the raw bytes of
  the state and ÷ the stored bytes of a full "bytegroup" save of the same state.
* Save time: (a) ``jckpt.save`` of the new state, no compression (the default, the yardstick),
  (b) XOR + ``jckpt.save`` of the XOR tree with "bytegroup", (c) a full "bytegroup" save, for
  reference; the three in an order rotated from run to run, ``sync`` before each, a fresh
  directory each; per-run ratio b ÷ a, median and range over --runs.  The whole state is
  --scale copies of the trained state (separate arrays, same values) so that a save lasts long
  enough to time.  Also timed: (b') the same XOR tree saved with "zstd" (no byte grouping).
* Restore time: (a) ``jckpt.restore`` of the full save vs (b) restore of the base + restore of
  the delta + XOR back (sequential: an upper bound of a pipelined restore); warm page cache.
  Every delta restore is checked bit-exact against the new state.
* Speed per core: one thread (tensorstore data_copy_concurrency 1, numpy XOR), every leaf
  chunked with jckpt's chunk shape, coded into a memory kvstore: encode = XOR + byte group +
  zstd, decode = decode + XOR back; MiB/s of raw state bytes, median over runs.

Verdict (issue 12 §3): kept only if the delta save stores <= 75% of a full save's bytes AND its
median save time is <= 1.2x a full save's, for the whole train state.

Run:  PYTHONPATH=$PWD python3 benchmarks/delta_encoding.py [--quick] [--runs N] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts

import jckpt
from jckpt import chunking, storage

MiB = 2**20
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
CODEC = "bytegroup"
METHODS = ("full", "delta", "delta-zstd", "full-bytegroup")


# --------------------------------------------------------------------------- pure helpers
def bits(a) -> np.ndarray:
    """The array's bits as unsigned integers of the same width (a view, no copy)."""
    a = np.asarray(a)
    return a.view(UINT[a.dtype.itemsize])


def xor_delta(new, base) -> np.ndarray:
    """``new``'s bits XOR ``base``'s bits (same shape and dtype): zero where a value is unchanged."""
    if np.shape(new) != np.shape(base) or np.asarray(new).dtype != np.asarray(base).dtype:
        raise ValueError("new and base must have the same shape and dtype")
    return np.bitwise_xor(bits(new), bits(base))


def undo_delta(delta, base) -> np.ndarray:
    """The new array from its XOR delta and the base, bit-exact, in the base's dtype."""
    base = np.asarray(base)
    return np.bitwise_xor(np.asarray(delta), bits(base)).view(base.dtype)


def encode(delta: np.ndarray, context: ts.Context, path: str, chunk_bytes: int) -> ts.TensorStore:
    """Writes ``delta`` to a memory kvstore as a zarr3 array with jckpt's chunk shape and "bytegroup"."""
    shape = list(delta.shape)
    chunk = chunking.chunk_shape(shape, delta.dtype.itemsize, shape, chunk_bytes)
    spec = storage.zarr3_spec({"driver": "memory", "path": path}, shape, delta.dtype.name, chunk, CODEC)
    store = ts.open(spec, create=True, context=context).result()
    store.write(delta).result()
    return store


def stored_bytes(context: ts.Context) -> int:
    """Bytes of the chunks in the context's memory kvstore (metadata excluded)."""
    kv = ts.KvStore.open({"driver": "memory"}, context=context).result()
    return sum(len(kv.read(k).result().value) for k in kv.list().result() if not k.endswith(b"zarr.json"))


def roundtrip(new: np.ndarray, base: np.ndarray, chunk_bytes: int = chunking.DEFAULT_CHUNK_BYTES):
    """XOR + byte group + entropy code ``new`` against ``base``, decode, XOR back: (decoded, stored bytes)."""
    context = ts.Context({"data_copy_concurrency": {"limit": 1}})
    store = encode(xor_delta(new, base), context, "d/", chunk_bytes)
    return undo_delta(store.read().result(), base), stored_bytes(context)


def same_bits(a, b) -> bool:
    return np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(bits(a), bits(b))


# --------------------------------------------------------------------------- states
def _cnn_finetune():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "incremental.py")
    spec = importlib.util.spec_from_file_location("_bench_incremental", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cnn_finetune


def _host(tree):
    """Host numpy copies, in jax's dtypes (a Python int step becomes int32, as jax restores it)."""
    return jax.tree.map(lambda a: np.array(jax.numpy.asarray(a)), tree)


def _bf16(tree):
    return jax.tree.map(
        lambda a: a.astype(ml_dtypes.bfloat16) if np.issubdtype(a.dtype, np.floating) else a, tree
    )


def groups(state) -> dict:
    adam = state["opt_state"][0]
    return {"params": state["params"], "mu": adam.mu, "nu": adam.nu, "all": state}


def scaled(tree, copies: int):
    return {f"copy_{i:02d}": jax.tree.map(np.copy, tree) for i in range(copies)}


def _disk_bytes(root: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
        if not f.endswith(".json")
    )


def _like(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tree)


# --------------------------------------------------------------------------- measurements
def measure_bytes(new, base, workdir: str) -> dict:
    """Per group: raw bytes, stored bytes of a full bytegroup save and of the delta save."""
    out = {}
    options = jckpt.SaveOptions(compression=CODEC)
    g_new, g_base = groups(new), groups(base)
    for name in g_new:
        row = {"raw": sum(np.asarray(a).nbytes for a in jax.tree.leaves(g_new[name]))}
        delta = jax.tree.map(xor_delta, g_new[name], g_base[name])
        for which, tree, opts in (
            ("full_bytegroup", g_new[name], options),
            ("delta", delta, options),
            ("delta_zstd", delta, jckpt.SaveOptions(compression="zstd")),
        ):
            root = tempfile.mkdtemp(dir=workdir)
            jckpt.save(root, tree, step=0, options=opts)
            row[which] = _disk_bytes(root)
            shutil.rmtree(root)
        out[name] = row
    return out


def per_core(new, base, chunk_bytes: int) -> tuple[float, float]:
    """(encode, decode) seconds for the whole state on one thread."""
    pairs = [
        (np.asarray(n), np.asarray(b))
        for n, b in zip(jax.tree.leaves(new), jax.tree.leaves(base))
        if np.ndim(n) > 0
    ]
    context = ts.Context({"data_copy_concurrency": {"limit": 1}})
    start = time.perf_counter()
    stores = [encode(xor_delta(n, b), context, f"a{i}/", chunk_bytes) for i, (n, b) in enumerate(pairs)]
    enc = time.perf_counter() - start
    start = time.perf_counter()
    decoded = [undo_delta(s.read().result(), b) for s, (_, b) in zip(stores, pairs)]
    dec = time.perf_counter() - start
    if not all(same_bits(d, n) for d, (n, _) in zip(decoded, pairs)):
        raise AssertionError("per-core round trip is not bit-exact")
    return enc, dec


def time_run(new, base, base_root: str, workdir: str, run: int) -> dict:
    """One run: the three saves (rotated order), then their restores (same order)."""
    options = {
        "full": jckpt.SaveOptions(),
        "full-bytegroup": jckpt.SaveOptions(compression=CODEC),
        "delta": jckpt.SaveOptions(compression=CODEC),
        "delta-zstd": jckpt.SaveOptions(compression="zstd"),
    }
    like_new, like_delta = _like(new), _like(jax.tree.map(lambda b: bits(b), base))
    roots, out = {}, {}
    k = run % len(METHODS)
    order = METHODS[k:] + METHODS[:k]
    for method in order:
        root = roots[method] = tempfile.mkdtemp(dir=workdir)
        os.sync()
        start = time.perf_counter()
        if method.startswith("full"):
            jckpt.save(root, new, step=1, options=options[method])
        else:
            delta = jax.tree.map(xor_delta, new, base)
            out["xor_s"] = time.perf_counter() - start
            jckpt.save(root, delta, step=1, options=options[method])
        out[f"save/{method}"] = time.perf_counter() - start
    for method in order:
        start = time.perf_counter()
        if method.startswith("delta"):
            b = jckpt.restore(base_root, like=_like(base))
            d = jckpt.restore(roots[method], like=like_delta)
            restored = jax.tree.map(undo_delta, d, b)
        else:
            restored = jax.block_until_ready(jckpt.restore(roots[method], like=like_new))
        out[f"restore/{method}"] = time.perf_counter() - start
        if method.startswith("delta") and not all(
            same_bits(r, n) for r, n in zip(jax.tree.leaves(restored), jax.tree.leaves(new))
        ):
            raise AssertionError("delta restore is not bit-exact")
    for root in roots.values():
        shutil.rmtree(root)
    return out


def run_config(new, base, args, workdir: str) -> dict:
    result = {"bytes": measure_bytes(new, base, workdir)}
    big_new, big_base = scaled(new, args.scale), scaled(base, args.scale)
    base_root = tempfile.mkdtemp(dir=workdir)
    jckpt.save(base_root, big_base, step=0)
    raw = sum(np.asarray(a).nbytes for a in jax.tree.leaves(big_new))
    time_run(big_new, big_base, base_root, workdir, 0)  # warm-up, not recorded
    result["runs"] = [time_run(big_new, big_base, base_root, workdir, r) for r in range(args.runs)]
    shutil.rmtree(base_root)
    speeds = [per_core(new, base, args.chunk_bytes) for _ in range(args.runs)]
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(new) if np.ndim(a) > 0)
    result["encode_MiBps_core"] = nbytes / MiB / statistics.median(s[0] for s in speeds)
    result["decode_MiBps_core"] = nbytes / MiB / statistics.median(s[1] for s in speeds)
    result["timed_state_MiB"] = raw / MiB
    return result


# --------------------------------------------------------------------------- report
def _mr(values) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(results: dict, args, loads: tuple[float, float], seconds: float) -> bool:
    print(
        f"\ndelta encoding (XOR base, blosc byte shuffle + zstd 1, 1 MiB blocks = jckpt 'bytegroup'); "
        f"CNN fine-tuning, Adam; warm-up {args.warmup} steps; {args.runs} runs, order rotated; "
        f"{os.cpu_count()} CPUs; load average {loads[0]:.2f} at the start, {loads[1]:.2f} at the end; "
        f"{seconds:.0f} s"
    )
    print(
        "\nbytes (stored data bytes; bytegroup = full save with compression='bytegroup'; "
        "delta-zstd = the XOR tree with compression='zstd', no byte grouping)"
    )
    print(
        f"{'dtype':8s} {'steps':>5s} {'group':6s} {'raw MiB':>8s} {'bytegroup/raw':>13s} "
        f"{'delta/raw':>9s} {'delta/bytegroup':>15s} {'delta-zstd/raw':>14s}"
    )
    for (dtype, steps), r in results.items():
        for name, b in r["bytes"].items():
            print(
                f"{dtype:8s} {steps:5d} {name:6s} {b['raw'] / MiB:8.2f} "
                f"{b['full_bytegroup'] / b['raw']:13.3f} "
                f"{b['delta'] / b['raw']:9.3f} {b['delta'] / b['full_bytegroup']:15.3f} "
                f"{b['delta_zstd'] / b['raw']:14.3f}"
            )
    print(
        "\ntimes of the whole train state x --scale, seconds, median (min-max); ratios per run "
        "(x full = ÷ the plain full save, or restore, of the same run)"
    )
    print(
        f"{'dtype':8s} {'steps':>5s} {'MiB':>6s} {'full save':>20s} {'delta save':>20s} "
        f"{'delta x full':>20s} {'delta-zstd x full':>20s} {'bytegroup x full':>20s} {'xor s':>6s} "
        f"{'full restore':>20s} {'delta restore':>20s} {'restore x full':>20s} {'enc MiB/s/core':>14s} "
        f"{'dec MiB/s/core':>14s}"
    )
    verdicts, kept = [], True
    for (dtype, steps), r in results.items():
        runs = r["runs"]
        col = lambda key, runs=runs: [x[key] for x in runs]
        ratio = lambda a, b, runs=runs: [x[a] / x[b] for x in runs]
        print(
            f"{dtype:8s} {steps:5d} {r['timed_state_MiB']:6.1f} {_mr(col('save/full')):>20s} "
            f"{_mr(col('save/delta')):>20s} {_mr(ratio('save/delta', 'save/full')):>20s} "
            f"{_mr(ratio('save/delta-zstd', 'save/full')):>20s} "
            f"{_mr(ratio('save/full-bytegroup', 'save/full')):>20s} {statistics.median(col('xor_s')):6.3f} "
            f"{_mr(col('restore/full')):>20s} {_mr(col('restore/delta')):>20s} "
            f"{_mr(ratio('restore/delta', 'restore/full')):>20s} {r['encode_MiBps_core']:14.0f} "
            f"{r['decode_MiBps_core']:14.0f}"
        )
        r["verdict"] = {}
        for method, key in (("delta", "delta"), ("delta-zstd", "delta_zstd")):
            b = r["bytes"]["all"]
            saved = 1 - b[key] / b["raw"]
            time_ratio = statistics.median(ratio(f"save/{method}", "save/full"))
            ok = saved >= 0.25 and time_ratio <= 1.2
            if method == "delta":
                kept &= ok
            r["verdict"][method] = {"bytes_saved": saved, "save_time_ratio": time_ratio, "meets_rule": ok}
            verdicts.append(
                f"{dtype:8s} {steps:5d} steps {method:10s}: bytes saved {saved:6.1%} (need >= 25%: "
                f"{'ok' if saved >= 0.25 else f'MISS by {0.25 - saved:.1%} points'}), save time "
                f"{time_ratio:.2f}x full (need <= 1.2x: "
                f"{'ok' if time_ratio <= 1.2 else f'MISS by {time_ratio - 1.2:.2f}x'}) "
                f"-> {'meets' if ok else 'fails'} the rule"
            )
    print("\nverdict (whole train state; rule: >= 25% of bytes saved AND <= 1.2x the full save's time)")
    print("\n".join(verdicts))
    print(
        f"=> {'KEEP' if kept else 'DO NOT KEEP'} delta encoding (XOR + byte grouping + entropy coding)"
        f"{'' if kept else ': the rule is not met in every configuration'}"
    )
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 steps only, float32 only, 2 runs, scale 2")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per configuration (default 5)")
    parser.add_argument("--steps", default="10,100,1000", help="Adam steps between base and new")
    parser.add_argument("--warmup", type=int, default=300, help="Adam steps before the first base")
    parser.add_argument("--scale", type=int, default=8, help="copies of the state in the timed saves")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--chunk-bytes", type=int, default=jckpt.SaveOptions().chunk_bytes)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    parser.add_argument("--json", default=None, help="write every measurement to this file")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.dtypes, args.scale = "10", "float32", 2
        args.runs = args.runs or 2
    args.runs = args.runs or 5
    loads = os.getloadavg()[0], 0.0
    print(f"load average {loads[0]:.2f} at the start", flush=True)
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="jckpt-delta-", dir=args.dir)
    results = {}
    try:
        states = _cnn_finetune()(0)
        base = _host(next(states))
        base = _host(states.send(args.warmup))
        for steps in (int(s) for s in args.steps.split(",")):
            new = _host(states.send(steps))
            for dtype in args.dtypes.split(","):
                pair = (new, base) if dtype == "float32" else (_bf16(new), _bf16(base))
                results[(dtype, steps)] = run_config(*pair, args, workdir)
                print(
                    f"{dtype} {steps} steps done, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True
                )
            base = new
        states.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    loads = loads[0], os.getloadavg()[0]
    report(results, args, loads, time.time() - started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "load": loads,
                    "results": {f"{d}/{s}": r for (d, s), r in results.items()},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
