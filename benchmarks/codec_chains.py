"""Tensorstore zarr3 codec chains on a trained checkpoint: ratio and speed per core, no jckpt in the loop.

Trains the MLP of benchmarks/lossless_compression.py (params + Adam moments), then, in this
process pinned to one CPU (``sched_setaffinity`` before jax/tensorstore start a thread,
tensorstore's data_copy_concurrency 1), writes every float leaf as one zarr3 array (one chunk
per leaf) to an in-memory kvstore with each chain and reads it back.  Chains are interleaved
(order rotated each repetition).  Speed = uncompressed bytes ÷ (time with the chain − time
with no compressor), the difference taken within each repetition, median over repetitions;
ratio = uncompressed bytes ÷ stored chunk bytes.

Chain names: ``zstdL`` (zstd level L), ``blosc-{shuffle|bitshuffle}-{zstd|lz4hc}L[-bsK]``
(blosc, level L, blocksize K KiB; default blosc's own choice).

Run:  python benchmarks/codec_chains.py --runs 5
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lossless_compression import train  # noqa: E402

DEFAULT = ("zstd1,zstd3,blosc-shuffle-zstd1,blosc-shuffle-zstd5,blosc-bitshuffle-zstd1,"
           "blosc-bitshuffle-zstd5,blosc-bitshuffle-lz4hc9,blosc-shuffle-zstd1-bs128,"
           "blosc-shuffle-zstd1-bs256,blosc-shuffle-zstd1-bs512,blosc-shuffle-zstd1-bs1024,"
           "blosc-shuffle-zstd3-bs1024,blosc-shuffle-zstd1-bs4096,blosc-bitshuffle-zstd1-bs1024")


def chain(name: str) -> list[dict]:
    if name == "none":
        return []
    if name.startswith("zstd"):
        return [{"name": "zstd", "configuration": {"level": int(name[4:])}}]
    _, shuffle, codec, *rest = name.split("-")
    cname = codec.rstrip("0123456789")
    config = {"cname": cname, "clevel": int(codec[len(cname):]), "shuffle": shuffle}
    if rest:
        config["blocksize"] = int(rest[0][2:]) * 1024
    return [{"name": "blosc", "configuration": config}]


def one_pass(arrays: list[np.ndarray], dtype: str, codecs: list[dict]) -> tuple[int, float, float]:
    """(stored bytes, write s, read s) of the arrays with this chain, in a fresh memory kvstore."""
    context = ts.Context({"data_copy_concurrency": {"limit": 1}})
    stores = [
        ts.open({"driver": "zarr3", "kvstore": {"driver": "memory", "path": f"a{i}/"},
                 "metadata": {"shape": list(a.shape), "data_type": dtype,
                              "chunk_grid": {"name": "regular",
                                             "configuration": {"chunk_shape": list(a.shape)}},
                              "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]
                              + codecs}},
                create=True, context=context).result()
        for i, a in enumerate(arrays)
    ]
    start = time.perf_counter()
    for store, a in zip(stores, arrays):
        store.write(a).result()
    write = time.perf_counter() - start
    kv = ts.KvStore.open({"driver": "memory"}, context=context).result()
    stored = sum(len(kv.read(k).result().value) for k in kv.list().result() if b"/c" in k)
    start = time.perf_counter()
    for store in stores:
        store.read().result()
    return stored, write, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chains", default=DEFAULT)
    args = parser.parse_args()
    names = ["none"] + args.chains.split(",")
    leaves = [np.asarray(a) for a in jax.tree.leaves(train(args.steps)) if a.dtype == np.float32]
    print(f"pinned to CPU {sorted(os.sched_getaffinity(0))}; {args.runs} repetitions, chains interleaved; "
          f"load average {os.getloadavg()[0]:.1f}; 1 MB = 1e6 bytes of uncompressed data")
    print(f"{'chain':32s} {'f32 ratio':>9s} {'comp':>6s} {'decomp':>6s}  {'bf16 ratio':>10s} {'comp':>6s} "
          f"{'decomp':>6s}   (MB/s/core)")
    rows = {n: [] for n in names}
    for dtype, arrays in (("float32", leaves), ("bfloat16", [a.astype(ml_dtypes.bfloat16) for a in leaves])):
        nbytes = sum(a.nbytes for a in arrays)
        res = {n: [] for n in names}
        for rep in range(args.runs + 1):  # repetition 0 warms up
            k = rep % len(names)
            for n in names[k:] + names[:k]:
                if rep:
                    res[n].append(one_pass(arrays, dtype, chain(n)))
                else:
                    one_pass(arrays, dtype, chain(n))
        for n in names[1:]:
            comp = statistics.median(r[1] - b[1] for r, b in zip(res[n], res["none"]))
            decomp = statistics.median(r[2] - b[2] for r, b in zip(res[n], res["none"]))
            rows[n] += [nbytes / res[n][0][0], nbytes / comp / 1e6 if comp > 0 else float("nan"),
                        nbytes / decomp / 1e6 if decomp > 0 else float("nan")]
    for n in names[1:]:
        f, b = rows[n][:3], rows[n][3:]
        print(f"{n:32s} {f[0]:9.3f} {f[1]:6.0f} {f[2]:6.0f}  {b[0]:10.3f} {b[1]:6.0f} {b[2]:6.0f}")


if __name__ == "__main__":
    main()
