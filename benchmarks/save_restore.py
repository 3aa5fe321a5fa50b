"""Save/restore benchmark: jckpt vs Orbax ``StandardCheckpointer`` vs the raw disk.

Run ``python benchmarks/save_restore.py`` (``--help`` for options).  Results and
the method are in docs/benchmarks.md.

Method
------
* Scenarios: (a) a ~768 MiB train state (params + Adam mu/nu of a small
  transformer, 194 float32 leaves); (b) 2,000 leaves of 1 KiB; (c) the save's
  peak host RSS, measured in every save (the target is judged on (a)).
* Every phase -- save, warm restore, cold restore -- of every contender runs in
  a fresh worker process (so restores pay first-touch page faults as a
  restarted job would, and allocator state never leaks between phases).  Each
  worker first does a tiny save + restore so one-time set-up (imports,
  tensorstore contexts, Orbax handlers) is not timed.  Contenders are
  interleaved run by run, in an order rotated every run; the tables show
  medians, and ratios are ratios of those medians from one invocation (the
  range of the per-run paired ratios is shown beside them).
* Save is timed until the data is durable: ``jckpt.save`` returns after its
  commit; Orbax's ``save`` + ``wait_until_finished``; the raw disk is
  ``np.save`` of each leaf into its own file + ``os.fsync`` of each file and
  of the directory (one thread, one file after the other).
* Restore: ``jckpt.restore(dir, like=abstract)`` and Orbax's
  ``restore(dir, abstract)`` (abstract = ``jax.ShapeDtypeStruct`` with
  ``.sharding``) return jax arrays (blocked on); the raw disk is ``np.load``
  of every file (numpy arrays, no device placement).  *Warm* restores read the
  page cache (the save just wrote the files); *cold* ones run after
  ``sync; echo 3 > /proc/sys/vm/drop_caches`` (needs root; skipped otherwise).
  Restored values are compared with the saved ones (untimed).
* Peak RSS: right before the timed call the worker runs ``malloc_trim(0)``
  (so freed heap memory cannot be reused for free) and writes ``5`` to
  ``/proc/self/clear_refs``, which resets the kernel's RSS high-water mark
  (``VmHWM``) to the current RSS; ``VmHWM`` is read after the call.  Reported:
  ``VmHWM - VmRSS before``, i.e. the host memory the call needed on top of
  what the process already held (for a save: the state itself, jax arrays on
  CPU).  Exact, no sampling; falls back to a psutil sampling thread (2 ms)
  where clear_refs is not writable.
* ``--profile`` prints a cProfile of one jckpt save and restore instead.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

# Running a script puts its folder first on sys.path, where a sibling benchmark
# (e.g. benchmarks/compression.py) would shadow a module jax imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

CONTENDERS = ("jckpt", "orbax", "raw")
SCENARIOS = {
    "a": "train state ~768 MiB: params + Adam mu/nu, ~200 float32 leaves",
    "b": "2,000 leaves of 1 KiB",
}
MiB = 2**20


# --------------------------------------------------------------------------- states
def _transformer_shapes(d: int, layers: int, vocab: int, seq: int) -> dict[str, Any]:
    """A transformer-like mix of leaf shapes: embeddings, [d, 4d] MLPs, biases, layernorms."""
    shapes: dict[str, Any] = {"embed": {"tokens": (vocab, d), "positions": (seq, d)}}
    for i in range(layers):
        shapes[f"layer_{i:02d}"] = {
            "ln1": {"scale": (d,), "bias": (d,)},
            "attn": {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d)},
            "ln2": {"scale": (d,), "bias": (d,)},
            "mlp": {"w1": (d, 4 * d), "b1": (4 * d,), "w2": (4 * d, d), "b2": (d,)},
        }
    shapes["final_ln"] = {"scale": (d,), "bias": (d,)}
    return shapes


def abstract_state(scenario: str):
    """The scenario's tree of ``jax.ShapeDtypeStruct`` (with the default device's sharding)."""
    import jax
    import numpy as np

    if scenario == "a":
        # 5 layers of d=1024 (12 d^2 floats each) + 4096x1024 tokens + 512x1024
        # positions = 258 MiB of params; x3 with mu and nu = ~774 MiB, 194 leaves.
        params = _transformer_shapes(d=1024, layers=5, vocab=4096, seq=512)
        shapes = {"step": (), "params": params,
                  "opt_state": {"count": (), "mu": params, "nu": params}}
    elif scenario == "b":
        shapes = {f"group_{g:02d}": {f"leaf_{i:02d}": (256,) for i in range(50)} for g in range(40)}
    else:
        raise ValueError(scenario)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, np.int32 if shape == () else np.float32,
                                           sharding=sharding),
        shapes, is_leaf=lambda x: isinstance(x, tuple),
    )


def build_state(abstract):
    """Deterministic values (leaf i drawn from seed i) as jax arrays on the CPU device."""
    import jax
    import numpy as np

    leaves, treedef = jax.tree.flatten(abstract)
    values = []
    for i, spec in enumerate(leaves):
        if spec.shape == ():
            host = np.asarray(1000 + i, spec.dtype)
        else:
            host = np.random.default_rng(i).standard_normal(spec.shape, dtype=np.float32)
        values.append(jax.device_put(host, spec.sharding))
        del host
    return jax.block_until_ready(jax.tree.unflatten(treedef, values))


def state_nbytes(abstract) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


# --------------------------------------------------------------------------- contenders
class Jckpt:
    def __init__(self):
        import jckpt

        self.jckpt = jckpt

    def save(self, path: str, state) -> None:
        self.jckpt.save(path, state, step=0)

    def restore(self, path: str, abstract):
        import jax

        return jax.block_until_ready(self.jckpt.restore(path, like=abstract))

    def close(self) -> None:
        pass


class Orbax:
    def __init__(self):
        import absl.logging
        import orbax.checkpoint as ocp

        absl.logging.set_verbosity(absl.logging.ERROR)
        self.ckptr = ocp.StandardCheckpointer()

    def save(self, path: str, state) -> None:
        self.ckptr.save(path, state)
        self.ckptr.wait_until_finished()

    def restore(self, path: str, abstract):
        import jax

        return jax.block_until_ready(self.ckptr.restore(path, abstract))

    def close(self) -> None:
        self.ckptr.close()


class Raw:
    """The disk's own speed: one ``.npy`` per leaf, each fsynced, then the directory."""

    def save(self, path: str, state) -> None:
        import jax
        import numpy as np

        os.makedirs(path)
        for i, leaf in enumerate(jax.tree.leaves(state)):
            with open(os.path.join(path, f"{i:05d}.npy"), "wb") as f:
                np.save(f, np.asarray(leaf))
                f.flush()
                os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def restore(self, path: str, abstract):
        import jax
        import numpy as np

        leaves, treedef = jax.tree.flatten(abstract)
        loaded = [np.load(os.path.join(path, f"{i:05d}.npy")) for i in range(len(leaves))]
        return jax.tree.unflatten(treedef, loaded)

    def close(self) -> None:
        pass


def make_contender(name: str):
    return {"jckpt": Jckpt, "orbax": Orbax, "raw": Raw}[name]()


# --------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    """Returns freed heap memory to the OS, so a later reuse of it shows up as RSS growth.

    Without it, memory freed while the state was built stays resident and a
    contender that reuses it looks free of cost.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRss:
    """Peak RSS over a block: the kernel's VmHWM after resetting it, else a sampling thread."""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.before = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method, self.thread = "VmHWM", None
        except OSError:
            import psutil

            self.method, self.samples, self.stop = "psutil", [self.before], threading.Event()
            proc = psutil.Process()

            def sample():
                while not self.stop.is_set():
                    self.samples.append(proc.memory_info().rss)
                    time.sleep(0.002)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.thread is None:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.samples)
        self.extra = max(0, self.peak - self.before)
        return False


def _dirty_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    return -1


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False where not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- worker
def _check_equal(saved, restored) -> None:
    import jax
    import numpy as np

    a, b = jax.tree.leaves(saved), jax.tree.leaves(restored)
    if len(a) != len(b):
        raise AssertionError(f"restored {len(b)} leaves, saved {len(a)}")
    for x, y in zip(a, b):
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            raise AssertionError("restored values differ from the saved ones")


def _warm_up(impl, workdir: str) -> None:
    """One tiny save + restore, so one-time set-up costs stay out of the timings."""
    import jax
    import numpy as np

    tiny = {"w": jax.device_put(np.ones((64, 64), np.float32)), "b": jax.device_put(np.ones(3))}
    tiny_abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tiny
    )
    path = os.path.join(workdir, "warmup")
    impl.save(path, tiny)
    _check_equal(tiny, impl.restore(path, tiny_abstract))
    shutil.rmtree(path)


def worker(contender: str, scenario: str, phase: str, workdir: str) -> dict[str, Any]:
    """One phase ("save", "warm" or "cold" restore) of one contender, in this fresh process."""
    import jax

    impl = make_contender(contender)
    abstract = abstract_state(scenario)
    nbytes = state_nbytes(abstract)
    _warm_up(impl, workdir)
    path = os.path.join(workdir, "ckpt")
    out: dict[str, Any] = {"state_bytes": nbytes, "leaves": len(jax.tree.leaves(abstract))}
    if phase == "save":
        state = build_state(abstract)
        os.sync()  # nobody pays for earlier writers' dirty pages
        with PeakRss() as mem:
            t0 = time.perf_counter()
            impl.save(path, state)
            out["seconds"] = time.perf_counter() - t0
        out.update(rss_extra=mem.extra, rss_method=mem.method, dirty_after=_dirty_bytes())
    else:
        if phase == "cold" and not drop_caches():
            raise PermissionError("cannot drop the page cache (needs root)")
        with PeakRss() as mem:
            t0 = time.perf_counter()
            restored = impl.restore(path, abstract)
            out["seconds"] = time.perf_counter() - t0
        out.update(rss_extra=mem.extra, rss_method=mem.method)
        _check_equal(build_state(abstract), restored)
    impl.close()
    return out


def profile(scenario: str, workdir: str, top: int) -> None:
    """cProfile of one jckpt save and one warm restore (public API only), printed by cumtime.

    Tensorstore's I/O runs on its own threads: it shows up here as time spent
    waiting in ``Future.result``.
    """
    import cProfile
    import pstats

    impl = Jckpt()
    abstract = abstract_state(scenario)
    state = build_state(abstract)
    _warm_up(impl, workdir)
    path = os.path.join(workdir, "ckpt")
    for name, call in (("save", lambda: impl.save(path, state)),
                       ("warm restore", lambda: impl.restore(path, abstract))):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(call)
        print(f"==== jckpt {name}, scenario {scenario}: {time.perf_counter() - t0:.3f} s ====")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(top)


# --------------------------------------------------------------------------- driver
def _run_phase(contender: str, scenario: str, phase: str, workdir: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", contender, "--phase", phase,
           "--scenario", scenario, "--dir", workdir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {contender}/{scenario}/{phase} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(contender: str, scenario: str, base: str, cold: bool) -> dict[str, Any]:
    """Save, warm restore and (optionally) cold restore, each in a fresh process, one fresh dir."""
    workdir = tempfile.mkdtemp(prefix=f"{scenario}-{contender}-", dir=base)
    try:
        save = _run_phase(contender, scenario, "save", workdir)
        warm = _run_phase(contender, scenario, "warm", workdir)
        out = {"state_bytes": save["state_bytes"], "leaves": save["leaves"],
               "save_s": save["seconds"], "save_rss_extra": save["rss_extra"],
               "rss_method": save["rss_method"], "dirty_after_save": save["dirty_after"],
               "restore_warm_s": warm["seconds"], "restore_rss_extra": warm["rss_extra"]}
        if cold:
            out["restore_cold_s"] = _run_phase(contender, scenario, "cold", workdir)["seconds"]
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _med(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def _paired(by_run: list[dict[str, dict]], key: str, num: str, den: str) -> tuple[float, float] | None:
    ratios = [r[num][key] / r[den][key] for r in by_run if key in r[num] and key in r[den]]
    return (min(ratios), max(ratios)) if ratios else None


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _rss(extra: float | None, state: int) -> str:
    return "—" if extra is None else f"{extra / MiB:.0f} ({extra / state:.2f}×)"


def report(scenario: str, by_run: list[dict[str, dict]], contenders: list[str]) -> tuple[str, dict]:
    """The markdown table of one scenario, and its summary numbers."""
    results = {c: [r[c] for r in by_run] for c in contenders}
    first = results[contenders[0]][0]
    mib = first["state_bytes"] / MiB
    lines = [
        f"### Scenario {scenario}: {SCENARIOS[scenario]} "
        f"({first['leaves']} leaves, {mib:.1f} MiB), median of {len(by_run)} runs",
        "",
        "| contender | save s | save MiB/s | restore warm s | restore cold s "
        "| save: extra RSS MiB (× state) | warm restore: extra RSS MiB (× state) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    med: dict[str, dict[str, float | None]] = {}
    for c in contenders:
        m = {k: _med(results[c], k) for k in ("save_s", "restore_warm_s", "restore_cold_s",
                                               "save_rss_extra", "restore_rss_extra")}
        med[c] = m
        lines.append(
            f"| {c} | {_fmt(m['save_s'])} | {_fmt(mib / m['save_s'], '.0f')} "
            f"| {_fmt(m['restore_warm_s'])} | {_fmt(m['restore_cold_s'])} "
            f"| {_rss(m['save_rss_extra'], first['state_bytes'])} "
            f"| {_rss(m['restore_rss_extra'], first['state_bytes'])} |"
        )
    summary: dict[str, Any] = {"medians": med, "state_bytes": first["state_bytes"]}

    def ratio(num, den, key):
        if num not in med or den not in med or med[num][key] is None or med[den][key] is None:
            return None, None
        return med[num][key] / med[den][key], _paired(by_run, key, num, den)

    rows = [
        ("save: jckpt speedup over Orbax (orbax s ÷ jckpt s)", "orbax", "jckpt", "save_s"),
        ("restore warm: jckpt speedup over Orbax", "orbax", "jckpt", "restore_warm_s"),
        ("restore cold: jckpt speedup over Orbax", "orbax", "jckpt", "restore_cold_s"),
        ("save: jckpt throughput ÷ raw disk (raw s ÷ jckpt s)", "raw", "jckpt", "save_s"),
        ("save: Orbax throughput ÷ raw disk", "raw", "orbax", "save_s"),
        ("restore warm: jckpt throughput ÷ raw np.load", "raw", "jckpt", "restore_warm_s"),
        ("restore cold: jckpt throughput ÷ raw np.load", "raw", "jckpt", "restore_cold_s"),
    ]
    lines += ["", "| ratio | median-based | per-run range |", "|---|---:|---:|"]
    for label, num, den, key in rows:
        value, span = ratio(num, den, key)
        if value is None:
            continue
        summary[f"{key}:{num}/{den}"] = value
        rng = "—" if span is None else f"{span[0]:.2f}–{span[1]:.2f}"
        lines.append(f"| {label} | {value:.2f}× | {rng} |")
    return "\n".join(lines), summary


def targets(summaries: dict[str, dict]) -> str:
    """The issue's targets, each with its measured value."""
    rows = []

    def add(name, value, goal, fmt="{:.2f}×"):
        if value is None:
            return
        ok = value >= goal if goal > 0 else value <= -goal
        shown = fmt.format(value)
        goal_text = f"≥ {goal}×" if goal > 0 else f"≤ {-goal:.0%}"
        rows.append(f"| {name} | {goal_text} | {shown} | {'met' if ok else 'MISSED'} |")

    a, b = summaries.get("a"), summaries.get("b")
    if a:
        add("(a) save vs Orbax", a.get("save_s:orbax/jckpt"), 1.5)
        add("(a) save vs raw disk", a.get("save_s:raw/jckpt"), 0.85)
        add("(a) restore vs Orbax (warm)", a.get("restore_warm_s:orbax/jckpt"), 1.5)
        add("(a) restore vs Orbax (cold)", a.get("restore_cold_s:orbax/jckpt"), 1.5)
    if b:
        add("(b) save vs Orbax", b.get("save_s:orbax/jckpt"), 10)
        add("(b) restore vs Orbax (warm)", b.get("restore_warm_s:orbax/jckpt"), 10)
        add("(b) restore vs Orbax (cold)", b.get("restore_cold_s:orbax/jckpt"), 10)
    if a and "jckpt" in a["medians"]:
        extra = a["medians"]["jckpt"]["save_rss_extra"] / a["state_bytes"]
        add("(c) save peak RSS over the state, (a)", extra, -0.25, "+{:.0%}")
    if not rows:
        return ""
    return "\n".join(["### Targets", "", "| target | goal | measured | |", "|---|---|---:|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per contender (median; default 3)")
    parser.add_argument("--scenario", choices=["a", "b", "all"], default="all",
                        help="a: ~768 MiB train state (its saves give (c), the RSS target); "
                        "b: 2,000 x 1 KiB leaves; all (default)")
    parser.add_argument("--dir", default=None,
                        help="where checkpoints are written (default: a temp dir under /tmp)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of jckpt,orbax,raw")
    parser.add_argument("--no-cold", action="store_true",
                        help="skip cold-cache restores (they need root to drop the page cache)")
    parser.add_argument("--json", default=None, help="also write every raw measurement here")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the comparison: cProfile one jckpt save + restore")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["save", "warm", "cold"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.scenario, args.phase, args.dir)))
        return 0

    if args.profile:
        workdir = tempfile.mkdtemp(prefix="jckpt-profile-", dir=args.dir or "/tmp")
        try:
            profile("a" if args.scenario == "all" else args.scenario, workdir, top=30)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0

    contenders = [c for c in args.contenders.split(",") if c]
    scenarios = ["a", "b"] if args.scenario == "all" else [args.scenario]
    cold = not args.no_cold and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    base = tempfile.mkdtemp(prefix="jckpt-bench-", dir=args.dir or "/tmp")
    started = time.time()
    all_runs: dict[str, list[dict[str, dict]]] = {}
    try:
        for scenario in scenarios:
            by_run = []
            for run in range(args.runs):
                order = contenders[run % len(contenders):] + contenders[: run % len(contenders)]
                results = {}
                for c in order:
                    results[c] = measure(c, scenario, base, cold)
                    r = results[c]
                    print(f"[{scenario} run {run + 1}/{args.runs}] {c:5s} save {r['save_s']:.3f}s "
                          f"restore warm {r['restore_warm_s']:.3f}s cold "
                          f"{_fmt(r.get('restore_cold_s'))}s extra RSS "
                          f"{r['save_rss_extra'] / MiB:.0f} MiB", file=sys.stderr, flush=True)
                by_run.append(results)
            all_runs[scenario] = by_run
    finally:
        shutil.rmtree(base, ignore_errors=True)

    summaries = {}
    print(f"jckpt save/restore benchmark — {os.cpu_count()} CPUs, "
          f"cold restores {'on' if cold else 'off'}, {time.time() - started:.0f} s\n")
    for scenario, by_run in all_runs.items():
        text, summaries[scenario] = report(scenario, by_run, contenders)
        print(text + "\n")
    print(targets(summaries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": all_runs, "summaries": summaries}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
