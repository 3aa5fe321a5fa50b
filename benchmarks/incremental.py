"""Incremental saves vs full saves, in one run (medians over --runs).

Scenarios (issue 4):
  finetune   90% of the leaves frozen, 10% change   -> bytes <= 12%, time <= 20% of a full save
  sparse     one row of a 64 MiB embedding changes -> bytes <= 25% of a full save (one chunk)
  unchanged  nothing changes                        -> bytes <= 1%
  dense      everything changes                    -> time <= 1.05x a full save
and restoring an incremental checkpoint (chunks spread over many saves) vs the same state saved full.

Run:  python benchmarks/incremental.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import jckpt

MiB = 2**20


def finetune_state(rng: np.random.Generator, total_mib: int = 256, leaves: int = 100) -> dict:
    per_leaf = total_mib * MiB // leaves // 4
    return {f"layer_{i:03d}": rng.standard_normal(per_leaf, dtype=np.float32) for i in range(leaves)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def one_run(workdir: str, options: jckpt.SaveOptions, rng: np.random.Generator) -> dict[str, float]:
    """Every scenario once; returns seconds and byte ratios."""
    out: dict[str, float] = {}

    def pair(name: str, base: dict, changed: dict) -> None:
        root = tempfile.mkdtemp(dir=workdir)
        full_info = jckpt.save(root, base, step=0, options=options)
        _drop_caches()
        full_time = _timed(lambda: jckpt.save(root, changed, step=1, options=options))
        _drop_caches()
        inc_time = _timed(
            lambda: jckpt.save(root, changed, step=2, kind="incremental", base=0, options=options)
        )
        inc_info = jckpt.info(root, 2)
        out[f"{name}/bytes_ratio"] = inc_info.bytes_written / full_info.bytes_written
        out[f"{name}/time_ratio"] = inc_time / full_time
        out[f"{name}/full_s"] = full_time
        out[f"{name}/incremental_s"] = inc_time
        shutil.rmtree(root)

    base = finetune_state(rng)
    names = sorted(base)
    tuned = dict(base)
    for name in names[: len(names) // 10]:  # 10% of the leaves train
        tuned[name] = base[name] + 1
    pair("finetune", base, tuned)
    pair("unchanged", base, base)
    pair("dense", base, {k: v + 1 for k, v in base.items()})

    embedding = rng.standard_normal((16384, 1024), dtype=np.float32)  # 64 MiB
    updated = embedding.copy()
    updated[12345] += 1.0
    pair("sparse", {"embedding": embedding}, {"embedding": updated})

    # restore: a chain of 10 incremental saves (each changing 10% of the leaves) vs the same state full
    root = tempfile.mkdtemp(dir=workdir)
    state = dict(base)
    jckpt.save(root, state, step=0, options=options)
    for step in range(1, 11):
        for name in names[(step - 1) * 10 : step * 10]:
            state[name] = state[name] + step
        jckpt.save(root, state, step=step, kind="incremental", options=options)
    full_root = tempfile.mkdtemp(dir=workdir)
    jckpt.save(full_root, state, step=10, options=options)
    like = {k: np.zeros_like(v) for k, v in state.items()}
    _drop_caches()
    out["restore/incremental_s"] = _timed(lambda: jckpt.restore(root, like=like))
    _drop_caches()
    out["restore/full_s"] = _timed(lambda: jckpt.restore(full_root, like=like))
    out["restore/time_ratio"] = out["restore/incremental_s"] / out["restore/full_s"]
    shutil.rmtree(root)
    shutil.rmtree(full_root)
    return out


TARGETS = {
    "finetune/bytes_ratio": ("<=", 0.12),
    "finetune/time_ratio": ("<=", 0.20),
    "sparse/bytes_ratio": ("<=", 0.25),
    "unchanged/bytes_ratio": ("<=", 0.01),
    "dense/time_ratio": ("<=", 1.05),
    "restore/time_ratio": ("<=", 1.10),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    parser.add_argument("--chunk-mib", type=float, default=jckpt.SaveOptions().chunk_bytes / MiB)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="jckpt-bench-", dir=args.dir)
    options = jckpt.SaveOptions(chunk_bytes=int(args.chunk_mib * MiB))
    rng = np.random.default_rng(0)
    try:
        runs = [one_run(workdir, options, rng) for _ in range(args.runs)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"incremental vs full, chunk {args.chunk_mib:g} MiB, median of {args.runs} runs")
    print(f"{'metric':28s} {'median':>9s} {'min':>9s} {'max':>9s}  target")
    for key in runs[0]:
        values = [r[key] for r in runs]
        target = TARGETS.get(key)
        verdict = ""
        if target:
            ok = statistics.median(values) <= target[1]
            verdict = f"{target[0]} {target[1]:g}  {'ok' if ok else 'MISS'}"
        print(f"{key:28s} {statistics.median(values):9.4f} {min(values):9.4f} {max(values):9.4f}  {verdict}")


if __name__ == "__main__":
    main()
