"""Lossless chunk compression on a really trained checkpoint: ratio and speed cost.

Trains an MLP (64-1024-1024-10, ~1.1 M parameters) with Adam on scikit-learn's digits
for --steps steps, then saves params + Adam moments in float32 and cast to bfloat16
with each of tensorstore's codecs jckpt offers, and reports on-disk ratio and
save/restore time relative to no compression (medians of --runs).

Run:  python benchmarks/lossless_compression.py --steps 300 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jckpt


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


def measure(state: dict, compression: str | None, runs: int, workdir: str) -> dict[str, float]:
    options = jckpt.SaveOptions(compression=compression)
    saves, restores, ratio = [], [], 0.0
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    for _ in range(runs):
        root = tempfile.mkdtemp(dir=workdir)
        start = time.perf_counter()
        info = jckpt.save(root, state, step=0, options=options)
        saves.append(time.perf_counter() - start)
        ratio = info.bytes_total / _disk_bytes(root)
        start = time.perf_counter()
        jckpt.restore(root, like=like)
        restores.append(time.perf_counter() - start)
        shutil.rmtree(root)
    return {"ratio": ratio, "save": statistics.median(saves), "restore": statistics.median(restores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trained = train(args.steps)
    states = {
        "float32": trained,
        "bfloat16": jax.tree.map(
            lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, trained
        ),
    }
    workdir = tempfile.mkdtemp(prefix="jckpt-compress-")
    try:
        header = ("dtype", "codec", "ratio", "save s", "x none", "restore s", "x none")
        print("{:9s} {:7s} {:>6s} {:>8s} {:>7s} {:>10s} {:>7s}".format(*header))
        for dtype, state in states.items():
            rows = {c: measure(state, c, args.runs, workdir) for c in (None, "zstd", "blosc")}
            for codec, row in rows.items():
                print(
                    f"{dtype:9s} {str(codec):7s} {row['ratio']:6.3f} {row['save']:8.4f} "
                    f"{row['save'] / rows[None]['save']:7.2f} {row['restore']:10.4f} "
                    f"{row['restore'] / rows[None]['restore']:7.2f}"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
