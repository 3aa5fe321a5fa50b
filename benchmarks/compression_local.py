"""Save and warm-restore time on the local disk, no compression vs a codec, at a size where I/O counts.

The trained MLP state of benchmarks/lossless_compression.py (float32 leaves of params + Adam
moments, 13 MiB) repeated 16 times (206 MiB float32, 103 MiB bfloat16: the values'
distribution is the trained one), saved with ``--codec`` and without, the order alternating
each repetition, ``sync`` before each save, into a temp dir under --dir (default: the
system's).  Prints medians (min-max) and codec ÷ none.

Run:  python benchmarks/compression_local.py --codec bytegroup --runs 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np

import jckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lossless_compression import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", default="bytegroup")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    leaves = [np.asarray(a) for a in jax.tree.leaves(train(300)) if a.dtype == np.float32]
    med = statistics.median
    print(f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    for dtype in (np.float32, ml_dtypes.bfloat16):
        state = {f"c{i}": [a.astype(dtype) for a in leaves] for i in range(args.copies)}
        nbytes = sum(a.nbytes for a in jax.tree.leaves(state))
        save = {None: [], args.codec: []}
        restore = {None: [], args.codec: []}
        for rep in range(args.runs):
            for codec in [None, args.codec][:: 1 if rep % 2 == 0 else -1]:
                root = tempfile.mkdtemp(prefix="jckpt-complocal-", dir=args.dir)
                try:
                    os.sync()
                    start = time.perf_counter()
                    jckpt.save(root, state, step=0, options=jckpt.SaveOptions(compression=codec))
                    save[codec].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    jax.block_until_ready(jckpt.restore(root))
                    restore[codec].append(time.perf_counter() - start)
                finally:
                    shutil.rmtree(root)
        name = np.dtype(dtype).name
        for codec in save:
            sv, rs = save[codec], restore[codec]
            print(f"{name:9s} {nbytes / 2**20:5.0f} MiB {str(codec):10s} "
                  f"save {med(sv):.3f} ({min(sv):.3f}-{max(sv):.3f}) s  "
                  f"warm restore {med(rs):.3f} ({min(rs):.3f}-{max(rs):.3f}) s")
        c = args.codec
        print(f"{name:9s} {c} ÷ none: save {med(save[c]) / med(save[None]):.2f}, "
              f"warm restore {med(restore[c]) / med(restore[None]):.2f}")


if __name__ == "__main__":
    main()
