"""Save/restore benchmark: jckpt vs Orbax (defaults, and compression off) vs the disk's limit.

Run ``python benchmarks/save_restore.py`` (``--help`` for options).  Results and
the method are in docs/benchmarks.md.

Method
------
* Scenarios: (a) a ~768 MiB train state (params + Adam mu/nu of a small
  transformer, 194 float32 leaves); (b) 2,000 leaves of 1 KiB; (c) the save's
  peak host RSS, measured in every save (the target is judged on (a)).
* Contenders: ``jckpt`` (``jckpt.save`` / ``jckpt.restore``); ``orbax``:
  Orbax's ``StandardCheckpointer()`` with its defaults (OCDBT, zstd);
  ``orbax-nc``: ``AsyncCheckpointer(PyTreeCheckpointHandler(use_compression=False))``
  (OCDBT, no compression); ``limit``: the disk's parallel limit -- the same
  bytes (the leaves' bytes back to back) cut into 16 MiB files, written and
  ``fsync``ed by 16 threads (then the directory is fsynced), and read back by
  16 threads (``preadv``) straight into numpy buffers of the leaves' shapes
  (no device placement).
* Phases, each in a fresh worker process (allocator state never carries over):
  - *save*: after an untimed tiny save + restore (imports and one-time set-up
    stay out), timed until durable (jckpt: ``save`` returns after its commit;
    Orbax: ``save`` + ``wait_until_finished``; limit: after the last fsync).
    ``sync`` runs before the timer.
  - *warm restore*: after the same untimed warm-up, a restore from the page
    cache (the save just wrote the files).
  - *resume*: what a restarted job pays.  The driver runs ``sync; echo 3 >
    /proc/sys/vm/drop_caches`` (needs root), then starts a fresh process that
    imports jax, then the contender's library, and restores, with no warm-up.
    Timed from just before the process is spawned to the state in hand
    (jax arrays blocked on; numpy buffers for the limit), and split into
    *imports* (process start + ``import jax`` + the library) and the *restore
    call* itself.  Note that a dropped cache makes imports cold too.
  Restored values are compared with the saved ones (untimed).
* Alternation: run *i* measures every contender (save, warm restore, resume)
  before run *i + 1* starts, in an order rotated every run.  Tables show
  medians and (min-max); ratios are ratios of the medians, with the range of
  the per-run paired ratios beside them.
* Peak RSS: right before the timed call the worker runs ``malloc_trim(0)``
  (so freed heap memory cannot be reused for free) and writes ``5`` to
  ``/proc/self/clear_refs``, which resets the kernel's RSS high-water mark
  (``VmHWM``) to the current RSS; ``VmHWM`` is read after the call.  Reported:
  ``VmHWM - VmRSS before``, i.e. the host memory the call needed on top of
  what the process already held (for a save: the state itself, jax arrays on
  CPU).  Exact, no sampling; falls back to a psutil sampling thread (2 ms)
  where clear_refs is not writable.  On CPU, a save's snapshot aliases the
  jax arrays' memory (``np.asarray`` of a CPU array is a view); on an
  accelerator the snapshot is a full host copy, so "+0%" holds on CPU only.
* ``--profile`` prints a cProfile of one jckpt save and restore instead.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
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

CONTENDERS = ("jckpt", "orbax", "orbax-nc", "limit")
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
    """``compression=True``: ``StandardCheckpointer()``, Orbax's defaults (OCDBT + zstd).

    ``compression=False``: ``PyTreeCheckpointHandler(use_compression=False)`` (OCDBT, no
    zstd), the only handler of orbax-checkpoint 0.12 with that switch.
    """

    def __init__(self, compression: bool = True):
        import absl.logging
        import orbax.checkpoint as ocp

        absl.logging.set_verbosity(absl.logging.ERROR)
        self.ocp, self.compression = ocp, compression
        if compression:
            self.ckptr = ocp.StandardCheckpointer()
        else:
            self.ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_compression=False))

    def save(self, path: str, state) -> None:
        if self.compression:
            self.ckptr.save(path, state)
        else:
            self.ckptr.save(path, args=self.ocp.args.PyTreeSave(state))
        self.ckptr.wait_until_finished()

    def restore(self, path: str, abstract):
        import jax

        if self.compression:
            out = self.ckptr.restore(path, abstract)
        else:
            restore_args = self.ocp.checkpoint_utils.construct_restore_args(abstract)
            out = self.ckptr.restore(
                path, args=self.ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
        return jax.block_until_ready(out)

    def close(self) -> None:
        self.ckptr.close()


LIMIT_FILE_BYTES = 16 * MiB
LIMIT_THREADS = 16


def _pieces(buffers) -> list[list[memoryview]]:
    """The buffers' bytes, back to back, cut into LIMIT_FILE_BYTES files (memoryview lists)."""
    import numpy as np

    files, cur, size = [], [], 0
    for b in buffers:
        mv = memoryview(np.asarray(b).reshape(-1).view(np.uint8))
        pos = 0
        while pos < len(mv):
            take = min(len(mv) - pos, LIMIT_FILE_BYTES - size)
            cur.append(mv[pos:pos + take])
            pos, size = pos + take, size + take
            if size == LIMIT_FILE_BYTES:
                files.append(cur)
                cur, size = [], 0
    if cur:
        files.append(cur)
    return files


def _io_all(fn, fd: int, views: list[memoryview]) -> None:
    """``os.pwritev``/``os.preadv`` of all views, in batches under IOV_MAX, resuming short ones."""
    offset = 0
    for start in range(0, len(views), 512):
        batch = list(views[start:start + 512])
        while batch:
            done = fn(fd, batch, offset)
            if done <= 0:
                raise OSError(f"short transfer at offset {offset}")
            offset += done
            while batch and done >= len(batch[0]):
                done -= len(batch[0])
                batch.pop(0)
            if done:
                batch[0] = batch[0][done:]


class Limit:
    """The disk's parallel limit: 16 MiB files, 16 threads, fsync each (save); 16 threads read."""

    def save(self, path: str, state) -> None:
        import concurrent.futures

        import jax
        import numpy as np

        os.makedirs(path)
        host = [np.asarray(x) for x in jax.tree.leaves(state)]  # a view on CPU, no copy

        def write(item):
            i, views = item
            fd = os.open(os.path.join(path, f"{i:05d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _io_all(os.pwritev, fd, views)
                os.fsync(fd)
            finally:
                os.close(fd)

        with concurrent.futures.ThreadPoolExecutor(LIMIT_THREADS) as pool:
            list(pool.map(write, enumerate(_pieces(host))))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def restore(self, path: str, abstract):
        import concurrent.futures

        import jax
        import numpy as np

        leaves, treedef = jax.tree.flatten(abstract)
        # Anonymous maps, not np.empty: numpy madvises large buffers for huge pages, whose
        # first touch compacts memory (measured: a cold read 0.83 s into np.empty, 0.65 s here).
        bufs = [
            np.frombuffer(mmap.mmap(-1, x.size * x.dtype.itemsize), x.dtype).reshape(x.shape)
            if x.size * x.dtype.itemsize >= 2**20 else np.empty(x.shape, x.dtype)
            for x in leaves
        ]  # fmt: skip

        def read(item):
            i, views = item
            fd = os.open(os.path.join(path, f"{i:05d}"), os.O_RDONLY)
            try:
                _io_all(os.preadv, fd, views)
            finally:
                os.close(fd)

        with concurrent.futures.ThreadPoolExecutor(LIMIT_THREADS) as pool:
            list(pool.map(read, enumerate(_pieces(bufs))))
        return jax.tree.unflatten(treedef, bufs)

    def close(self) -> None:
        pass


def make_contender(name: str):
    return {"jckpt": Jckpt, "orbax": Orbax, "orbax-nc": lambda: Orbax(compression=False),
            "limit": Limit}[name]()


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
    """One phase ("save", "warm" restore or "resume") of one contender, in this fresh process."""
    if phase == "resume":
        return resume_worker(contender, scenario, workdir)
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
        with PeakRss() as mem:
            t0 = time.perf_counter()
            restored = impl.restore(path, abstract)
            out["seconds"] = time.perf_counter() - t0
        out.update(rss_extra=mem.extra, rss_method=mem.method)
        _check_equal(build_state(abstract), restored)
    impl.close()
    return out


def resume_worker(contender: str, scenario: str, workdir: str) -> dict[str, Any]:
    """A resume: no warm-up; wall-clock stamps after the imports and when the state is in hand."""
    import jax  # what the training job imports anyway

    impl = make_contender(contender)  # imports the contender's library
    t_imported = time.time()
    abstract = abstract_state(scenario)
    with PeakRss() as mem:
        restored = impl.restore(os.path.join(workdir, "ckpt"), abstract)
    t_done = time.time()
    _check_equal(build_state(abstract), restored)  # untimed
    impl.close()
    return {"t_imported": t_imported, "t_done": t_done, "rss_extra": mem.extra,
            "leaves": len(jax.tree.leaves(abstract))}


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
    t_spawn = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {contender}/{scenario}/{phase} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["t_spawn"] = t_spawn
    return out


def measure(contender: str, scenario: str, base: str, resume: bool) -> dict[str, Any]:
    """``_measure``, tried twice: a failure (Orbax's async metadata write has failed under load,
    "No ArrayMetadata found") is recorded and retried once, not allowed to end the whole run."""
    errors = []
    for _ in range(2):
        try:
            out = _measure(contender, scenario, base, resume)
            out["failures"] = errors
            return out
        except RuntimeError as e:
            errors.append(str(e)[-600:])
            print(f"[{scenario}] {contender} failed, {'retrying' if len(errors) < 2 else 'giving up'}: "
                  f"{str(e).strip().splitlines()[-1][:300]}", file=sys.stderr, flush=True)
    return {"failures": errors}


def _measure(contender: str, scenario: str, base: str, resume: bool) -> dict[str, Any]:
    """Save, warm restore and (optionally) a resume, each in a fresh process, one fresh dir."""
    workdir = tempfile.mkdtemp(prefix=f"{scenario}-{contender}-", dir=base)
    try:
        save = _run_phase(contender, scenario, "save", workdir)
        warm = _run_phase(contender, scenario, "warm", workdir)
        out = {"state_bytes": save["state_bytes"], "leaves": save["leaves"],
               "save_s": save["seconds"], "save_rss_extra": save["rss_extra"],
               "rss_method": save["rss_method"], "dirty_after_save": save["dirty_after"],
               "restore_warm_s": warm["seconds"], "restore_rss_extra": warm["rss_extra"]}
        if resume:
            if not drop_caches():
                raise PermissionError("cannot drop the page cache (needs root); use --no-resume")
            r = _run_phase(contender, scenario, "resume", workdir)
            out.update(resume_s=r["t_done"] - r["t_spawn"],
                       resume_imports_s=r["t_imported"] - r["t_spawn"],
                       resume_call_s=r["t_done"] - r["t_imported"],
                       resume_rss_extra=r["rss_extra"])
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _values(results: list[dict], key: str) -> list[float]:
    return [r[key] for r in results if key in r]


def _med(results: list[dict], key: str) -> float | None:
    values = _values(results, key)
    return statistics.median(values) if values else None


def _paired(by_run: list[dict[str, dict]], key: str, num: str, den: str) -> tuple[float, float] | None:
    ratios = [r[num][key] / r[den][key] for r in by_run if key in r[num] and key in r[den]]
    return (min(ratios), max(ratios)) if ratios else None


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _cell(results: list[dict], key: str) -> str:
    """median (min–max) of a time."""
    values = _values(results, key)
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.2f}–{max(values):.2f})"


def _rss(extra: float | None, state: int) -> str:
    return "—" if extra is None else f"{extra / MiB:.0f} ({extra / state:.2f}×)"


TIME_KEYS = ("save_s", "restore_warm_s", "resume_s", "resume_imports_s", "resume_call_s")
PHASES = (("save", "save_s"), ("warm restore", "restore_warm_s"),
          ("resume, total", "resume_s"), ("resume, restore call", "resume_call_s"))


def report(scenario: str, by_run: list[dict[str, dict]], contenders: list[str]) -> tuple[str, dict]:
    """The markdown tables of one scenario, and its summary numbers."""
    results = {c: [r[c] for r in by_run] for c in contenders}
    first = next(r for c in contenders for r in results[c] if "state_bytes" in r)
    failures = {c: sum(len(r.get("failures", [])) for r in results[c]) for c in contenders}
    nbytes = first["state_bytes"]
    mib = nbytes / MiB
    lines = [
        f"### Scenario {scenario}: {SCENARIOS[scenario]} "
        f"({first['leaves']} leaves, {mib:.1f} MiB), median (min–max) of {len(by_run)} runs",
        "",
        "| contender | save s | save MiB/s | warm restore s | resume: total s "
        "| resume: imports s | resume: restore call s | save: extra RSS MiB (× state) "
        "| warm restore: extra RSS MiB (× state) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    med: dict[str, dict[str, float | None]] = {}
    for c in contenders:
        m = {k: _med(results[c], k) for k in (*TIME_KEYS, "save_rss_extra", "restore_rss_extra")}
        med[c] = m
        save_rate = _fmt(None if m["save_s"] is None else mib / m["save_s"], ".0f")
        lines.append(
            f"| {c} | {_cell(results[c], 'save_s')} | {save_rate} "
            f"| {_cell(results[c], 'restore_warm_s')} | {_cell(results[c], 'resume_s')} "
            f"| {_cell(results[c], 'resume_imports_s')} | {_cell(results[c], 'resume_call_s')} "
            f"| {_rss(m['save_rss_extra'], nbytes)} | {_rss(m['restore_rss_extra'], nbytes)} |"
        )
    lines += ["", "orbax = StandardCheckpointer() defaults (OCDBT + zstd); orbax-nc = "
              "PyTreeCheckpointHandler(use_compression=False) (OCDBT, no compression); limit = the "
              "same bytes as 16 MiB files, 16 threads, fsync each / read into numpy buffers. "
              "Save RSS: jax arrays on CPU, where the snapshot aliases them; on an accelerator a "
              "save's snapshot is a full host copy of the state, so +0% holds on CPU only."]
    failed = [f"{c}: {n}" for c, n in failures.items() if n]
    if failed:
        lines += ["", "Failed measurements (each retried once; a run whose retry failed too is left "
                  "out of that contender's medians): " + ", ".join(failed) + "."]
    summary: dict[str, Any] = {"medians": med, "state_bytes": nbytes, "failures": failures}

    def ratio(num, den, key):
        if num not in med or den not in med or med[num][key] is None or med[den][key] is None:
            return None, None
        return med[num][key] / med[den][key], _paired(by_run, key, num, den)

    lines += ["", "| ratio (of medians; per-run paired range) | save | warm restore "
              "| resume, total | resume, restore call |", "|---|---:|---:|---:|---:|"]
    rows = [(f"jckpt speedup over {o} ({o} s ÷ jckpt s)", o, "jckpt")
            for o in ("orbax", "orbax-nc")]
    rows += [("jckpt ÷ limit (limit s ÷ jckpt s)", "limit", "jckpt"),
             ("orbax ÷ limit", "limit", "orbax"), ("orbax-nc ÷ limit", "limit", "orbax-nc")]
    for label, num, den in rows:
        cells = []
        for _, key in PHASES:
            value, span = ratio(num, den, key)
            if value is not None:
                summary[f"{key}:{num}/{den}"] = value
            cells.append("—" if value is None else
                         f"{value:.2f}× ({span[0]:.2f}–{span[1]:.2f})" if span else f"{value:.2f}×")
        if any(c != "—" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def targets(summaries: dict[str, dict]) -> str:
    """Issue 12's targets (and the RSS bound), each with its measured value."""
    rows = []

    def add(name, value, goal, fmt="{:.2f}×"):
        if value is None:
            return
        ok = value >= goal if goal > 0 else value <= -goal
        shown = fmt.format(value)
        goal_text = f"≥ {goal}×" if goal > 0 else f"≤ {-goal:.0%}"
        rows.append(f"| {name} | {goal_text} | {shown} | {'met' if ok else 'MISSED'} |")

    a = summaries.get("a")
    if a:
        add("(a) save vs the parallel-write limit", a.get("save_s:limit/jckpt"), 0.85)
        add("(a) warm restore vs the parallel-read limit", a.get("restore_warm_s:limit/jckpt"), 0.85)
        add("(a) resume restore call (cold) vs the parallel-read limit",
            a.get("resume_call_s:limit/jckpt"), 0.85)
        add("(a) resume, total, vs Orbax defaults", a.get("resume_s:orbax/jckpt"), 3)
        add("(a) resume, total, vs Orbax without compression", a.get("resume_s:orbax-nc/jckpt"), 3)
        if "jckpt" in a["medians"] and a["medians"]["jckpt"]["save_rss_extra"] is not None:
            extra = a["medians"]["jckpt"]["save_rss_extra"] / a["state_bytes"]
            add("(c) save peak RSS over the state, (a), CPU only", extra, -0.25, "+{:.0%}")
    if not rows:
        return ""
    return "\n".join(["### Targets (issue 12)", "", "| target | goal | measured | |",
                      "|---|---|---:|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per contender (default 5)")
    parser.add_argument("--scenario", choices=["a", "b", "all"], default="all",
                        help="a: ~768 MiB train state (its saves give (c), the RSS target); "
                        "b: 2,000 x 1 KiB leaves; all (default)")
    parser.add_argument("--dir", default=None,
                        help="where checkpoints are written (default: a temp dir under /tmp)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of " + ",".join(CONTENDERS))
    parser.add_argument("--no-resume", action="store_true",
                        help="skip the cold fresh-process resumes (they need root to drop the page cache)")
    parser.add_argument("--json", default=None, help="also write every raw measurement here")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the comparison: cProfile one jckpt save + restore")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["save", "warm", "resume"], help=argparse.SUPPRESS)
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
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    scenarios = ["a", "b"] if args.scenario == "all" else [args.scenario]
    resume = not args.no_resume and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    base = tempfile.mkdtemp(prefix="jckpt-bench-", dir=args.dir or "/tmp")
    started = time.time()
    load = os.getloadavg()
    all_runs: dict[str, list[dict[str, dict]]] = {}
    try:
        for scenario in scenarios:
            by_run = []
            for run in range(args.runs):
                order = contenders[run % len(contenders):] + contenders[: run % len(contenders)]
                results = {}
                for c in order:
                    results[c] = measure(c, scenario, base, resume)
                    r = results[c]
                    if "save_s" not in r:
                        continue
                    print(f"[{scenario} run {run + 1}/{args.runs}] {c:8s} save {r['save_s']:.3f}s "
                          f"warm restore {r['restore_warm_s']:.3f}s resume "
                          f"{_fmt(r.get('resume_s'))}s (call {_fmt(r.get('resume_call_s'))}s) "
                          f"save extra RSS {r['save_rss_extra'] / MiB:.0f} MiB; "
                          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
                by_run.append(results)
                all_runs[scenario] = by_run
                if args.json:  # after every run, so an interrupted invocation keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"runs": all_runs}, f, indent=1)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    summaries = {}
    print(f"jckpt save/restore benchmark — {os.cpu_count()} CPUs, resumes (cold, fresh process) "
          f"{'on' if resume else 'off'}, {time.time() - started:.0f} s, load average "
          f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
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
