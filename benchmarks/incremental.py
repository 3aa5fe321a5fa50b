"""Incremental saves vs full saves, in one run (medians and ranges over --runs).

Scenarios (issues 4 and 12):
  finetune      256 MiB in 100 leaves, 10% of the leaves change -> bytes <= 12%, time <= 20% of a full save
  sparse        one row of a 64 MiB embedding changes          -> bytes <= 25% of a full save (one chunk)
  unchanged     nothing changes                                 -> bytes <= 1%
  dense         everything changes                              -> time <= 1.05x a full save
  small_leaves  400 leaves of 1 KiB-256 KiB (log-uniform, ~18 MiB), 5% of them change
                (a CNN / LoRA-like tree of small and medium leaves)
  lora          real fine-tuning: a frozen MLP (3 x 512x512 kernels, pre-trained with Adam on
                scikit-learn's digits) with rank-8 LoRA adapters trained by optax Adam; a save
                every --steps-per-save steps of the {base, lora, opt_state} state
  cnn           real fine-tuning: every parameter of a small CNN (2 conv + 2 dense) trained by
                optax Adam on digits; a save every --steps-per-save steps (every leaf changes)
and restoring an incremental checkpoint (chunks spread over many saves) vs the same state saved full.

Method: every pair of saves (a full and an incremental one of the same state, against the same
base) is timed in an order that alternates from run to run (and, in the fine-tuning runs, from
save to save), so neither always goes first; ``sync`` + drop the page cache before each timed
save (where permitted). Bytes are jckpt's own accounting: ``jckpt.info(root, step).bytes_written``
of the incremental save ÷ that of the full save of the same state (``bytes_total`` is printed
too). The fine-tuning scenarios report the median over their saves within a run; the table then
shows the median and range over runs.

Run:  python benchmarks/incremental.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402

import jckpt  # noqa: E402

MiB, KiB = 2**20, 2**10


def finetune_state(rng: np.random.Generator, total_mib: int = 256, leaves: int = 100) -> dict:
    per_leaf = total_mib * MiB // leaves // 4
    return {f"layer_{i:03d}": rng.standard_normal(per_leaf, dtype=np.float32) for i in range(leaves)}


def small_leaves_state(rng: np.random.Generator, leaves: int = 400) -> dict:
    """Leaves of 1 KiB to 256 KiB, log-uniform (float32), grouped like layers."""
    sizes = np.exp(rng.uniform(np.log(1 * KiB), np.log(256 * KiB), leaves)).astype(int) // 4
    state: dict = {}
    for i, n in enumerate(sizes):
        state.setdefault(f"block_{i // 8:02d}", {})[f"p{i % 8}"] = rng.standard_normal(
            int(n), dtype=np.float32)
    return state


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def save_pair(root: str, state, base_step: int, steps: tuple[int, int], full_first: bool,
              options: jckpt.SaveOptions) -> dict[str, float]:
    """A full and an incremental save (against ``base_step``) of ``state``, in the given order."""
    full_step, inc_step = steps
    times = {}

    def full():
        _drop_caches()
        times["full"] = _timed(lambda: jckpt.save(root, state, step=full_step, options=options))

    def incremental():
        _drop_caches()
        times["inc"] = _timed(lambda: jckpt.save(root, state, step=inc_step, kind="incremental",
                                                 base=base_step, options=options))

    for fn in (full, incremental) if full_first else (incremental, full):
        fn()
    f_info, i_info = jckpt.info(root, full_step), jckpt.info(root, inc_step)
    assert i_info.kind == "incremental", i_info.kind
    return {"bytes_ratio": i_info.bytes_written / f_info.bytes_written,
            "time_ratio": times["inc"] / times["full"], "full_s": times["full"],
            "incremental_s": times["inc"], "full_bytes": f_info.bytes_written,
            "incremental_bytes": i_info.bytes_written, "total_bytes": i_info.bytes_total}


def one_run(workdir: str, options: jckpt.SaveOptions, rng: np.random.Generator, run: int,
            args) -> dict[str, float]:
    """Every scenario once; returns seconds and byte ratios."""
    out: dict[str, float] = {}
    full_first = run % 2 == 0

    def pair(name: str, base: dict, changed: dict) -> None:
        root = tempfile.mkdtemp(dir=workdir)
        jckpt.save(root, base, step=0, options=options)
        r = save_pair(root, changed, 0, (1, 2) if full_first else (2, 1), full_first, options)
        for k in ("bytes_ratio", "time_ratio", "full_s", "incremental_s"):
            out[f"{name}/{k}"] = r[k]
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
    del embedding, updated

    small = small_leaves_state(rng)
    flat = [(g, k) for g in sorted(small) for k in sorted(small[g])]
    changed = {g: dict(v) for g, v in small.items()}
    for i in rng.choice(len(flat), len(flat) // 20, replace=False):  # 5% of the leaves
        g, k = flat[i]
        changed[g][k] = small[g][k] + 1
    pair("small_leaves", small, changed)

    for name, trainer in (("lora", lora_finetune), ("cnn", cnn_finetune)):
        cycles = finetune_saves(workdir, trainer(run), args.saves, args.steps_per_save, options,
                                full_first)
        for k in ("bytes_ratio", "time_ratio", "full_s", "incremental_s"):
            out[f"{name}/{k}"] = statistics.median(c[k] for c in cycles)
        out[f"{name}/state_MiB"] = cycles[0]["total_bytes"] / MiB

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
    restores = {}
    for which in (("incremental", "full") if full_first else ("full", "incremental")):
        _drop_caches()
        path = root if which == "incremental" else full_root
        restores[which] = _timed(lambda p=path: jckpt.restore(p, like=like))
    out["restore/incremental_s"] = restores["incremental"]
    out["restore/full_s"] = restores["full"]
    out["restore/time_ratio"] = restores["incremental"] / restores["full"]
    shutil.rmtree(root)
    shutil.rmtree(full_root)
    return out


# --------------------------------------------------------------------------- real fine-tuning
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)


def lora_finetune(seed: int):
    """A generator of train states: pre-trained frozen MLP + rank-8 LoRA adapters, Adam on the adapters."""
    import jax
    import jax.numpy as jnp
    import optax

    x_all, y_all = _digits()
    sizes, rank = [64, 512, 512, 512, 10], 8
    keys = jax.random.split(jax.random.key(seed), 2 * len(sizes))
    base = {f"dense_{i}": {"kernel": jax.random.normal(keys[i], (m, n)) * jnp.sqrt(2.0 / m),
                           "bias": jnp.zeros(n)}
            for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))}

    def forward(p, lora, x):
        h = x
        for i in range(len(sizes) - 1):
            w = p[f"dense_{i}"]["kernel"]
            if lora is not None:
                w = w + lora[f"dense_{i}"]["a"] @ lora[f"dense_{i}"]["b"]
            h = h @ w + p[f"dense_{i}"]["bias"]
            if i < len(sizes) - 2:
                h = jax.nn.relu(h)
        return h

    def loss(p, lora, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, lora, x), y).mean()

    rng = np.random.default_rng(seed)
    # "pre-training": 100 Adam steps on the full model, then the base is frozen
    tx = optax.adam(1e-3)
    opt = tx.init(base)

    @jax.jit
    def pre_step(p, s, x, y):
        g = jax.grad(lambda q: loss(q, None, x, y))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(100):
        b = rng.choice(len(x_all), 128, replace=False)
        base, opt = pre_step(base, opt, x_all[b], y_all[b])
    lora = {f"dense_{i}": {"a": jax.random.normal(keys[len(sizes) + i], (m, rank)) * 0.01,
                           "b": jnp.zeros((rank, n))}
            for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))}
    tx = optax.adam(1e-3)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, s, x, y):
        g = jax.grad(lambda q: loss(base, q, x, y))(lora)
        u, s = tx.update(g, s, lora)
        return optax.apply_updates(lora, u), s

    n = 0
    while True:
        steps = yield {"base": base, "lora": lora, "opt_state": opt, "step": n}
        for _ in range(steps):
            b = rng.choice(len(x_all), 128, replace=False)
            lora, opt = step(lora, opt, x_all[b], y_all[b])
        n += steps


def cnn_finetune(seed: int):
    """A generator of train states: a small CNN, every parameter trained by Adam."""
    import jax
    import jax.numpy as jnp
    import optax

    x_all, y_all = _digits()
    x_all = x_all.reshape(-1, 8, 8, 1)
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "conv1": {"kernel": jax.random.normal(k[0], (3, 3, 1, 32)) * 0.3, "bias": jnp.zeros(32)},
        "conv2": {"kernel": jax.random.normal(k[1], (3, 3, 32, 64)) * 0.06, "bias": jnp.zeros(64)},
        "dense1": {"kernel": jax.random.normal(k[2], (8 * 8 * 64, 256)) * 0.02, "bias": jnp.zeros(256)},
        "dense2": {"kernel": jax.random.normal(k[3], (256, 10)) * 0.06, "bias": jnp.zeros(10)},
    }

    def forward(p, x):
        for c in ("conv1", "conv2"):
            x = jax.lax.conv_general_dilated(x, p[c]["kernel"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + p[c]["bias"])
        x = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["dense1"]["kernel"] + p["dense1"]["bias"])
        return x @ p["dense2"]["kernel"] + p["dense2"]["bias"]

    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(forward(q, x), y).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    rng = np.random.default_rng(seed)
    n = 0
    while True:
        steps = yield {"params": params, "opt_state": opt, "step": n}
        for _ in range(steps):
            b = rng.choice(len(x_all), 64, replace=False)
            params, opt = step(params, opt, x_all[b], y_all[b])
        n += steps


def finetune_saves(workdir: str, states, saves: int, steps_per_save: int,
                   options: jckpt.SaveOptions, full_first: bool) -> list[dict[str, float]]:
    """Saves every ``steps_per_save`` steps: a chain of incremental saves (each against the
    previous one) in one root, and a full save of the same state in another; order alternates."""
    import jax

    inc_root, full_root = tempfile.mkdtemp(dir=workdir), tempfile.mkdtemp(dir=workdir)
    state = jax.block_until_ready(next(states))
    jckpt.save(inc_root, state, step=0, options=options)
    cycles = []
    for i in range(1, saves + 1):
        state = jax.block_until_ready(states.send(steps_per_save))
        first_full = full_first == (i % 2 == 1)
        times = {}
        for which in ("full", "inc") if first_full else ("inc", "full"):
            _drop_caches()
            if which == "full":
                times["full"] = _timed(
                    lambda s=state, i=i: jckpt.save(full_root, s, step=i, options=options))
            else:
                times["inc"] = _timed(lambda s=state, i=i: jckpt.save(
                    inc_root, s, step=i, kind="incremental", base=i - 1, options=options))
        f_info, i_info = jckpt.info(full_root, i), jckpt.info(inc_root, i)
        cycles.append({"bytes_ratio": i_info.bytes_written / f_info.bytes_written,
                       "time_ratio": times["inc"] / times["full"], "full_s": times["full"],
                       "incremental_s": times["inc"], "total_bytes": i_info.bytes_total})
    states.close()
    shutil.rmtree(inc_root)
    shutil.rmtree(full_root)
    return cycles


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
    parser.add_argument("--saves", type=int, default=6, help="saves per fine-tuning run (default 6)")
    parser.add_argument("--steps-per-save", type=int, default=20,
                        help="optimizer steps between saves in the fine-tuning runs (default 20)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="jckpt-bench-", dir=args.dir)
    options = jckpt.SaveOptions(chunk_bytes=int(args.chunk_mib * MiB))
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0]
    started = time.time()
    try:
        runs = []
        for run in range(args.runs):
            runs.append(one_run(workdir, options, rng, run, args))
            print(f"run {run + 1}/{args.runs} ({'full' if run % 2 == 0 else 'incremental'} first) "
                  f"done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"incremental vs full, chunk {args.chunk_mib:g} MiB, median of {args.runs} runs "
          f"(order alternating), {time.time() - started:.0f} s, load average {load:.1f} at the "
          f"start, {os.getloadavg()[0]:.1f} at the end; fine-tuning: {args.saves} saves every "
          f"{args.steps_per_save} steps, state "
          f"lora {runs[0]['lora/state_MiB']:.2f} MiB, cnn {runs[0]['cnn/state_MiB']:.2f} MiB")
    print(f"{'metric':28s} {'median':>9s} {'min':>9s} {'max':>9s}  target")
    for key in runs[0]:
        if key.endswith("state_MiB"):
            continue
        values = [r[key] for r in runs]
        target = TARGETS.get(key)
        verdict = ""
        if target:
            ok = statistics.median(values) <= target[1]
            verdict = f"{target[0]} {target[1]:g}  {'ok' if ok else 'MISS'}"
        print(f"{key:28s} {statistics.median(values):9.4f} {min(values):9.4f} {max(values):9.4f}  {verdict}")


if __name__ == "__main__":
    main()
