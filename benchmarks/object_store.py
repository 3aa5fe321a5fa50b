"""Object-store benchmark: jckpt on S3 (moto) against the best raw paths, requests per save, Orbax on GCS.

Run ``python benchmarks/object_store.py`` (about 6 minutes on 2 cores;
``--quick`` about 1.5; ``--help`` for options).  Needs the ``bench`` extra
(moto_server, boto3, gcp-storage-emulator, orbax-checkpoint, gcsfs).  Results
and the method are in docs/storage.md, section "Performance".

Method
------
* Servers: one ``moto_server`` (S3) and one ``gcp-storage-emulator`` (GCS JSON
  API, in memory), started here on free ports of 127.0.0.1 and stopped at the
  end; no traffic leaves 127.0.0.1 (``LOOPBACK_ONLY_ENV`` keeps the Google
  clients off the metadata server).  The emulator runs through a small launcher
  that fixes two artifacts of Python's ``http.server`` under it, and its bucket
  has soft delete off (retention 0, a setting GCS has too):

  - it answers ``Expect: 100-continue``: otherwise curl (inside tensorstore)
    waits 1 s before sending every body over 1 MiB (~80 s for a 768 MiB save);
  - its listen backlog is 256, not 5: with 5, concurrent connections overflow
    it and each dropped SYN costs a 1 s retransmit (measured: jckpt's 768 MiB
    save 4.3-9.8 s instead of 2.2-2.5 s, the raw path 2.4-2.8 s instead of 2.0-2.1);
  - soft delete would keep every deleted object, and the emulator rewrites the
    metadata of all objects on every write: each run would slow the next ones.

  The emulator still serves one request at a time.
* States (built by ``benchmarks/save_restore.py``): (a) the ~768 MiB train
  state, params + Adam mu/nu, 194 float32 leaves; (b) 2,000 leaves of 1 KiB.
* S3 contenders, each writing the same bytes into its own prefix of one bucket:

  - ``jckpt``: ``jckpt.save(s3://...)`` (returns after the manifest PUT, the
    commit) and ``jckpt.restore(s3://..., like=abstract)`` (jax arrays, every
    chunk's hash verified);
  - ``ts-raw``: tensorstore's s3 kvstore, the state's bytes (all leaves
    concatenated) cut into 16 MiB objects, every PUT in flight at once under
    ``--concurrency`` (jckpt's own limit is 32), then every GET;
  - ``boto3``: the same 16 MiB objects, ``put_object`` / ``get_object`` from a
    thread pool of ``--concurrency`` threads;
  - ``boto3-mpu``: the whole state as ONE object through boto3's managed
    multipart upload (``--part-mib`` parts, ``--concurrency`` threads) and its
    managed ranged download.  moto answers every ranged GET by copying the
    whole object first (moto/s3/responses.py ``_handle_range_header`` gets
    ``key.value``), so this download costs O(parts x object) on moto only.

* Runs alternate: in run r the contenders go in an order rotated by r; each
  saves (timed in this process, warmed up by a tiny save of its own), then a
  FRESH process restores (a resume: it imports, opens the store, restores a
  tiny object or checkpoint untimed to warm up, then times the restore), then
  the prefix is emptied with exact deletes.  Every restore is checked
  bit-exact (xxh3-128 of all bytes, untimed).  Reported: median and range
  [min-max] of the runs, and jckpt's throughput / the best raw path's (the raw
  contender with the lowest median time), with the range of the per-run ratios.
* Requests per save: jckpt saves through ``tests/faultproxy.py`` (no faults)
  with every request's method and path recorded: into a fresh root and into a
  root that already holds steps, a ``CheckpointManager`` save (lease held
  across saves), and one restore.  Broken down by key kind (lease, marker,
  manifest, list, chunk, zarr.json) and method.
* GCS: jckpt, ts-raw (gcs kvstore, same objects) and Orbax (configurations in
  ``ORBAX_CONFIGS``) on the emulator, same alternation, fresh-process restores.
  Orbax reaches ``gs://`` through gcsfs (directory operations) and
  tensorstore's gcs driver (``TENSORSTORE_GCS_HTTP_URL``, set as
  ``jckpt.storage.prepare_environment`` does).  Orbax's default (OCDBT) is
  tried and reported when it fails; requests per save of jckpt and Orbax on
  GCS are counted the same way.
* Load: /proc/loadavg before and after, and the share of the machine's CPU
  used by other processes during the run (from /proc/stat minus this process
  tree's own CPU time).  moto and the emulator are single Python processes:
  their CPU bounds every contender, so ratios say more than MiB/s.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
# A script's folder comes first on sys.path, where a sibling benchmark could shadow a module jax imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.join(_REPO, "tests"))  # servers.py, faultproxy.py

MiB = 2**20
OBJECT_BYTES = 16 * MiB  # raw paths' object size = jckpt's default chunk size
S3_CONTENDERS = ("jckpt", "ts-raw", "boto3", "boto3-mpu", "jckpt-bytegroup")
JCKPT_CODECS = {"jckpt": None, "jckpt-bytegroup": "bytegroup"}  # SaveOptions.compression of each
GCS_CONTENDERS = ("jckpt", "ts-raw", "orbax", "orbax-nocomp", "orbax-ocdbt")
RAW = ("ts-raw", "boto3", "boto3-mpu")
ORBAX_CONFIGS = {
    "orbax": "StandardCheckpointer(use_ocdbt=False): zarr2, zstd level 1 (Orbax's default codec)",
    "orbax-nocomp": "PyTreeCheckpointer(use_ocdbt=False, use_compression=False): zarr2, uncompressed",
    "orbax-ocdbt": "StandardCheckpointer(): Orbax's defaults (OCDBT, zarr2, zstd)",
}
SCENARIOS = {
    "a": "train state ~768 MiB (params + Adam mu/nu, 194 float32 leaves)",
    "b": "2,000 x 1 KiB leaves",
}
WORKER_TIMEOUT = 600
# Keeps every Google client on 127.0.0.1: tensorstore takes this token instead of looking for credentials
# (which ends at the GCE metadata server); google-auth (under gcsfs) skips its metadata-server probe; gcsfs
# skips its bucket-layout RPC (which asks google-auth for credentials on every listing); any metadata
# lookup left would go to a closed loopback port.
LOOPBACK_ONLY_ENV = {
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "jckpt-bench",
    "NO_GCE_CHECK": "true",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
}


# --------------------------------------------------------------------------- plumbing
_AWS_NOISE = re.compile(
    rb"^[EWI]\d{4} [\d:.]+\s+\d+ (common-io|AuthCredentialsProvider|google_auth_provider\.cc)[:\]]"
)


@contextlib.contextmanager
def quiet_aws_logs():
    """Drops the lines tensorstore's credential code logs to fd 2 (missing ~/.aws files, the test token).

    fd 2 becomes a pipe (inherited by worker processes); a thread forwards
    every other line to the real stderr.
    """
    read_fd, write_fd = os.pipe()
    real = os.dup(2)
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not _AWS_NOISE.match(line):
                    os.write(real, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer here is gone: the pump sees EOF once workers are too
        thread.join(timeout=5)
        os.close(real)


class LoadMeter:
    """How busy the machine was with OTHER work: /proc/loadavg, and /proc/stat CPU minus this tree's."""

    def __init__(self):
        self.loadavg_before = _loadavg()
        self.busy0, self.total0 = _proc_stat()
        self.own0 = _own_cpu()
        self.wall0 = time.monotonic()

    def finish(self) -> dict[str, Any]:
        busy, total = _proc_stat()
        ticks = os.sysconf("SC_CLK_TCK")
        cpus = os.cpu_count() or 1
        wall = time.monotonic() - self.wall0
        busy_s = (busy - self.busy0) / ticks
        own_s = _own_cpu() - self.own0
        return {
            "cpus": cpus,
            "loadavg_before": self.loadavg_before,
            "loadavg_after": _loadavg(),
            "wall_s": wall,
            "busy_share": busy_s / (wall * cpus),
            "own_share": own_s / (wall * cpus),
            "others_share": max(0.0, busy_s - own_s) / (wall * cpus),
        }


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _proc_stat() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu() -> float:
    """CPU seconds of this process and of its children that were waited for (servers, workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _states_module():
    """benchmarks/save_restore.py (its states), imported by path so the folder stays off sys.path."""
    path = os.path.join(_HERE, "save_restore.py")
    spec = importlib.util.spec_from_file_location("_save_restore_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaf_bytes(state) -> list[bytes]:
    import jax
    import numpy as np

    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(state)]


def _digest(chunks) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _objects(stream: bytes) -> list[bytes]:
    """``stream`` cut into OBJECT_BYTES pieces (the raw paths' objects)."""
    return [stream[i : i + OBJECT_BYTES] for i in range(0, len(stream), OBJECT_BYTES)]


def _object_key(prefix: str, i: int) -> str:
    return f"{prefix}/obj{i:05d}"


def _split(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix`` or ``gs://bucket/prefix``."""
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    return bucket, prefix.strip("/")


def _tiny_state():
    import jax
    import numpy as np

    return {"w": jax.device_put(np.ones((64, 64), np.float32)), "b": jax.device_put(np.ones(3, np.float32))}


def _abstract_of(state):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _kvstore(url: str, concurrency: int):
    from jckpt import storage

    spec = storage.kvstore_spec(url)
    return storage.open_kvstore(spec, storage.context(request_concurrency=concurrency))


def empty_prefix(url: str) -> int:
    """Deletes every key under ``url`` (listed, then exact deletes)."""
    from jckpt import storage

    kv = _kvstore(url, 32)
    return storage.delete_keys(kv, storage.list_keys(kv))


def stored_bytes(url: str, endpoint: str) -> int:
    """The bytes stored under an s3:// ``url`` (object sizes, as listed)."""
    bucket, prefix = _split(url)
    pages = _boto3_client(endpoint, 1).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


def _boto3_client(endpoint: str, concurrency: int):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(max_pool_connections=max(10, concurrency)),
    )  # fmt: skip


def _transfer_config(concurrency: int, part_mib: int):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=part_mib * MiB, multipart_chunksize=part_mib * MiB,
        max_concurrency=concurrency, use_threads=True,
    )  # fmt: skip


def _orbax_checkpointer(name: str):
    import absl.logging
    import orbax.checkpoint as ocp

    absl.logging.set_verbosity(absl.logging.ERROR)
    for noisy in ("gcsfs", "google.auth"):  # credential look-ups that end as anonymous, as intended here
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if name == "orbax":
        return ocp.StandardCheckpointer(use_ocdbt=False)
    if name == "orbax-nocomp":
        return ocp.PyTreeCheckpointer(use_ocdbt=False, use_compression=False)
    if name == "orbax-ocdbt":
        return ocp.StandardCheckpointer()
    raise ValueError(name)


def _worker_failure(proc: subprocess.CompletedProcess) -> str | None:
    """Why a save worker failed (Orbax may only log an error of its background save), or None."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ValueError: ")]
    if proc.returncode == 0 and proc.stdout.splitlines()[-1:] != [] and not errors:
        if proc.stdout.splitlines()[-1].startswith("RESULT "):
            return None
    lines = errors or proc.stderr.strip().splitlines() or [f"exit {proc.returncode}, no output"]
    return lines[-1].split(" [tensorstore_spec")[0][:400]


# --------------------------------------------------------------------------- contenders (saves)
class Saver:
    """One contender's saves, in this process.  ``save`` returns seconds until durable."""

    def __init__(self, name: str, args, endpoint: str | None):
        self.name, self.args, self.endpoint = name, args, endpoint
        self.client = _boto3_client(endpoint, args.concurrency) if name.startswith("boto3") else None
        self.ckptr = _orbax_checkpointer(name) if name.startswith("orbax") else None
        self.scenario: str | None = None  # set by bench_scenario

    def _save_in_worker(self, url: str) -> float:
        """A save in a fresh process (warmed up there): a failure and its noise stay out of this one."""
        job = {"contender": self.name, "scenario": self.scenario, "url": url, "count_save": True}
        job["timed"] = True
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
        failure = _worker_failure(proc)
        if failure:
            raise RuntimeError(failure)
        return json.loads(proc.stdout.splitlines()[-1][len("RESULT ") :])["seconds"]

    def save(self, url: str, state, objects: list[bytes], stream: bytes) -> float:
        name, args = self.name, self.args
        if name in JCKPT_CODECS:
            import jckpt

            start = time.perf_counter()
            jckpt.save(url, state, step=1, options=jckpt.SaveOptions(compression=JCKPT_CODECS[name]))
            return time.perf_counter() - start
        if name == "orbax-ocdbt" and self.scenario is not None:
            return self._save_in_worker(url)
        if name.startswith("orbax"):
            import orbax.checkpoint as ocp

            start = time.perf_counter()
            self.ckptr.save(url, state)
            if isinstance(self.ckptr, ocp.AsyncCheckpointer):
                self.ckptr.wait_until_finished()
            return time.perf_counter() - start
        bucket, prefix = _split(url)
        if name == "ts-raw":
            kv = _kvstore(url, args.concurrency)  # opening is no request
            start = time.perf_counter()
            for future in [kv.write(f"obj{i:05d}", data) for i, data in enumerate(objects)]:
                future.result()
            return time.perf_counter() - start
        if name == "boto3":
            from concurrent.futures import ThreadPoolExecutor

            def put(i: int) -> None:
                self.client.put_object(Bucket=bucket, Key=_object_key(prefix, i), Body=objects[i])

            with ThreadPoolExecutor(args.concurrency) as pool:
                start = time.perf_counter()
                list(pool.map(put, range(len(objects))))
                return time.perf_counter() - start
        if name == "boto3-mpu":
            config = _transfer_config(args.concurrency, args.part_mib)
            start = time.perf_counter()
            self.client.upload_fileobj(io.BytesIO(stream), bucket, f"{prefix}/state.bin", Config=config)
            return time.perf_counter() - start
        raise ValueError(name)

    def warm_up(self, url: str) -> None:
        """A tiny save of this contender (untimed): imports, connections, handlers; workers restore it."""
        tiny = _tiny_state()
        stream = b"".join(_leaf_bytes(tiny))
        self.save(url, tiny, _objects(stream), stream)

    def close(self) -> None:
        if self.ckptr is not None:
            self.ckptr.close()


# --------------------------------------------------------------------------- restores (fresh process)
def restore_in_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Runs one restore in a fresh process (this script with ``--worker``); returns its result."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"restore worker failed ({job['contender']}, exit {proc.returncode}):\n{tail}")


def worker_main(job: dict[str, Any]) -> dict[str, Any]:
    """A resume: import, open, warm up on the contender's tiny save, then one timed restore, checked."""
    started = time.perf_counter()
    import jax
    import numpy as np

    states = _states_module()
    name, url, warm = job["contender"], job["url"], job["warm_url"]
    abstract = states.abstract_state(job["scenario"]) if name.startswith(("jckpt", "orbax")) else None
    tiny_abstract = _abstract_of(_tiny_state())
    bucket, prefix = _split(url)
    warm_bucket, warm_prefix = _split(warm)
    nobj = -(-job["nbytes"] // OBJECT_BYTES)

    if name in JCKPT_CODECS:
        import jckpt

        def restore(where, like):
            return jax.block_until_ready(jckpt.restore(where, like=like))

        restore(warm, tiny_abstract)
        start = time.perf_counter()
        restored = restore(url, abstract)
    elif name.startswith("orbax"):
        import absl.logging
        import orbax.checkpoint as ocp

        absl.logging.set_verbosity(absl.logging.ERROR)
        logging.getLogger("gcsfs").setLevel(logging.ERROR)
        ckptr = ocp.StandardCheckpointer()  # reads every configuration (the metadata says which)

        def restore(where, like):
            return jax.block_until_ready(ckptr.restore(where, like))

        restore(warm, tiny_abstract)
        start = time.perf_counter()
        restored = restore(url, abstract)
    elif name == "ts-raw":
        kv = _kvstore(url, job["concurrency"])
        _kvstore(warm, job["concurrency"]).read("obj00000").result()
        start = time.perf_counter()
        restored = [f.result().value for f in [kv.read(f"obj{i:05d}") for i in range(nobj)]]
    elif name == "boto3":
        from concurrent.futures import ThreadPoolExecutor

        client = _boto3_client(job["endpoint"], job["concurrency"])
        client.get_object(Bucket=warm_bucket, Key=_object_key(warm_prefix, 0))["Body"].read()

        def get(i: int) -> bytes:
            return client.get_object(Bucket=bucket, Key=_object_key(prefix, i))["Body"].read()

        with ThreadPoolExecutor(job["concurrency"]) as pool:
            start = time.perf_counter()
            restored = list(pool.map(get, range(nobj)))
    elif name == "boto3-mpu":
        client = _boto3_client(job["endpoint"], job["concurrency"])
        config = _transfer_config(job["concurrency"], job["part_mib"])
        client.download_fileobj(warm_bucket, f"{warm_prefix}/state.bin", io.BytesIO(), Config=config)
        out = io.BytesIO()
        start = time.perf_counter()
        client.download_fileobj(bucket, f"{prefix}/state.bin", out, Config=config)
        restored = [out.getbuffer()]
    else:
        raise ValueError(name)
    seconds = time.perf_counter() - start
    chunks = restored if abstract is None else [np.asarray(x).tobytes() for x in jax.tree.leaves(restored)]
    if _digest(chunks) != job["digest"]:
        raise AssertionError(f"{name}: the restored bytes differ from the saved ones")
    return {"seconds": seconds, "process_s": time.perf_counter() - started}


# --------------------------------------------------------------------------- timing runs
def _rotated(items: list[str], run: int) -> list[str]:
    k = run % len(items)
    return items[k:] + items[:k]


def bench_scenario(backend: str, scenario: str, args, contenders: list[str], bucket: str, endpoint, warm):
    """Alternating save + fresh-process restore runs of every contender; returns the summary."""
    states = _states_module()
    abstract = states.abstract_state(scenario)
    state = states.build_state(abstract)
    leaves = _leaf_bytes(state)
    stream = b"".join(leaves)
    del leaves
    objects = _objects(stream)
    digest = _digest([stream])
    nbytes = len(stream)
    scheme = "s3" if backend == "s3" else "gs"
    savers = {c: warm["savers"][c] for c in contenders}
    for saver in savers.values():
        saver.scenario = scenario
    times = {c: {"save": [], "restore": []} for c in contenders}
    failed: dict[str, str] = {}
    for run in range(args.runs):
        for contender in _rotated(list(contenders), run):
            if contender in failed:
                continue
            url = f"{scheme}://{bucket}/{scenario}-{contender}-{run}"
            try:
                saved = savers[contender].save(url, state, objects, stream)
            except Exception as e:  # e.g. Orbax's OCDBT on the emulator
                why = str(e).splitlines()[0].split(" [tensorstore_spec")[0]
                failed[contender] = f"{type(e).__name__}: {why[:400]}"
                print(f"  run {run} {contender:12s} save FAILED: {failed[contender]}", flush=True)
                with contextlib.suppress(Exception):
                    empty_prefix(url)
                continue
            job = {
                "contender": contender, "scenario": scenario, "url": url, "warm_url": warm["urls"][contender],
                "nbytes": nbytes, "digest": digest, "concurrency": args.concurrency,
                "part_mib": args.part_mib, "endpoint": endpoint,
            }  # fmt: skip
            result = restore_in_worker(job)
            times[contender]["save"].append(saved)
            times[contender]["restore"].append(result["seconds"])
            if contender in JCKPT_CODECS and backend == "s3":
                times[contender].setdefault("stored", []).append(stored_bytes(url, endpoint))
            empty_prefix(url)
            print(
                f"  run {run} {contender:12s} save {saved:7.3f} s  restore {result['seconds']:7.3f} s"
                f"  (restore process {result['process_s']:.1f} s)",
                flush=True,
            )
    del state, objects, stream
    return summarize(backend, scenario, nbytes, times, failed)


def summarize(backend, scenario, nbytes, times, failed) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": backend, "scenario": scenario, "bytes": nbytes, "failed": failed}
    for contender, phases in times.items():
        for phase in ("save", "restore"):
            values = phases[phase]
            if not values:
                continue
            median = statistics.median(values)
            out.setdefault("contenders", {}).setdefault(contender, {})[phase] = {
                "runs_s": values, "median_s": median, "min_s": min(values), "max_s": max(values),
                "MiBps": nbytes / MiB / median,
            }  # fmt: skip
        if phases.get("stored") and contender in out.get("contenders", {}):
            out["contenders"][contender]["stored_bytes"] = phases["stored"][-1]
    measured = out.get("contenders", {})
    for phase in ("save", "restore"):
        raws = {c: v[phase]["median_s"] for c, v in measured.items() if c in RAW and phase in v}
        if "jckpt" not in measured or not raws:
            continue
        best = min(raws, key=raws.get)
        jck = measured["jckpt"][phase]["runs_s"]
        ref = measured[best][phase]["runs_s"]
        paired = [r / j for j, r in zip(jck, ref)]
        out[f"{phase}_vs_best_raw"] = {
            "best_raw": best,
            "ratio": raws[best] / measured["jckpt"][phase]["median_s"],  # throughput ratio
            "paired_min": min(paired), "paired_max": max(paired),
        }  # fmt: skip
        if phase in measured.get("jckpt-bytegroup", {}):
            coded = measured["jckpt-bytegroup"][phase]
            out[f"{phase}_bytegroup_vs_none"] = {
                "ratio": coded["median_s"] / measured["jckpt"][phase]["median_s"],
                "paired": [c / j for c, j in zip(coded["runs_s"], jck)],
            }
        orbax = {c: v[phase]["median_s"] for c, v in measured.items() if c.startswith("orbax") and phase in v}
        if orbax:
            out[f"{phase}_vs_orbax"] = {c: t / measured["jckpt"][phase]["median_s"] for c, t in orbax.items()}
    return out


def report(summary: dict[str, Any]) -> str:
    nbytes = summary["bytes"]
    lines = [
        f"== {summary['backend']}, scenario {summary['scenario']}: {SCENARIOS[summary['scenario']]}, "
        f"{nbytes / MiB:.1f} MiB",
        f"{'contender':13s} {'save s: median [range]':>26s} {'MiB/s':>7s}   "
        f"{'restore s: median [range]':>27s} {'MiB/s':>7s}",
    ]
    for contender, phases in summary.get("contenders", {}).items():
        cells = []
        for phase in ("save", "restore"):
            p = phases.get(phase)
            cells.append(
                f"{p['median_s']:8.3f} [{p['min_s']:.3f}-{p['max_s']:.3f}] {p['MiBps']:7.1f}" if p else "-"
            )
        lines.append(f"{contender:13s} {cells[0]:>34s}   {cells[1]:>35s}")
    for contender, why in summary["failed"].items():
        lines.append(f"{contender:13s} FAILED: {why}")
    stored = {c: p["stored_bytes"] for c, p in summary.get("contenders", {}).items() if "stored_bytes" in p}
    for contender, size in stored.items():
        lines.append(f"{contender} stores {size / MiB:.1f} MiB (state bytes / stored {nbytes / size:.3f})")
    for phase in ("save", "restore"):
        cmp = summary.get(f"{phase}_vs_best_raw")
        if cmp:
            verdict = "met" if cmp["ratio"] >= 0.8 else "NOT met"
            lines.append(
                f"jckpt {phase} throughput / best raw ({cmp['best_raw']}): {cmp['ratio']:.3f} "
                f"(per run {cmp['paired_min']:.2f}-{cmp['paired_max']:.2f}); target >= 0.80: {verdict}"
            )
        coded = summary.get(f"{phase}_bytegroup_vs_none")
        if coded:
            lines.append(
                f"jckpt-bytegroup {phase} time / jckpt's (no compression): {coded['ratio']:.3f} "
                f"(per run {min(coded['paired']):.2f}-{max(coded['paired']):.2f})"
            )
        for contender, ratio in summary.get(f"{phase}_vs_orbax", {}).items():
            lines.append(f"jckpt {phase} throughput / {contender}: {ratio:.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- request counting
def counting_proxy(upstream: str):
    """A fault-free FaultProxy that also records every request's (method, path)."""
    from faultproxy import FaultProxy, _Handler

    class Recorder(_Handler):
        def _handle(self) -> None:
            with self.server.proxy._lock:
                self.server.proxy.log.append((self.command, self.path))
            super()._handle()

        def _reply(self, status: int, *rest, **kwargs) -> None:
            with self.server.proxy._lock:
                self.server.proxy.statuses[status] += 1
            super()._reply(status, *rest, **kwargs)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

    proxy = FaultProxy(upstream, max_connections=128)
    proxy.log, proxy.statuses = [], collections.Counter()
    proxy._server.RequestHandlerClass = Recorder
    proxy._server.handle_error = lambda *_: None  # a client that hung up: its request is counted already
    return proxy


def _reset(proxy) -> None:
    proxy.reset_counts()
    proxy.log.clear()
    proxy.statuses.clear()


def _key_kind(key: str) -> str:
    """The kind of a key under a checkpoint root (jckpt's keys, and Orbax's for comparison)."""
    last = key.rsplit("/", 1)[-1]
    if key.startswith("leases/"):
        return "lease"
    if key == "jckpt.json":
        return "marker"
    if key.startswith("manifests/"):
        return "manifest"
    if key.startswith("tags/"):
        return "tag"
    if last in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
        return "zarr.json" if last == "zarr.json" else "array metadata"
    if "/c/" in key or re.fullmatch(r"\d+(\.\d+)*", last) or key.startswith("d/") or "/d/" in key:
        return "chunk"
    return "other metadata"


def classify(method: str, path: str, bucket: str, prefix: str) -> tuple[str, str]:
    """(key kind, operation) of one S3 (path-style) or GCS JSON API request."""
    parsed = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parsed.query)
    p = urllib.parse.unquote(parsed.path)
    key = None
    if "/storage/v1/b/" in p:  # GCS JSON API: /storage/v1/b/B/o[/KEY], /upload/..., /download/...
        parts = p.split("/b/", 1)[1].split("/", 2)
        if len(parts) == 3 and parts[1] == "o":
            key = parts[2]
        elif "name" in query:
            key = query["name"][0]
        operation = {"POST": "write", "DELETE": "delete"}.get(method, method)
        if method == "GET" and key is not None:
            operation = "read" if query.get("alt") == ["media"] or p.startswith("/download/") else "stat"
        if key is None:
            return ("list" if method == "GET" and len(parts) == 2 else "bucket/other"), method
    else:  # S3, path style: /BUCKET/KEY
        _, _, key = p.lstrip("/").partition("/")
        operation = method
        if not key:
            if method == "GET" and ("list-type" in query or "prefix" in query):
                return "list", "GET"
            return "bucket/other", method
    base = prefix + "/" if prefix else ""
    if not key.startswith(base):
        return "outside root", operation
    return _key_kind(key[len(base) :]), operation


def breakdown(log: list[tuple[str, str]], url: str, statuses: dict[int, int]) -> dict[str, Any]:
    bucket, prefix = _split(url)
    by_kind: dict[str, collections.Counter] = {}
    methods: collections.Counter = collections.Counter()
    for method, path in log:
        kind, operation = classify(method, path, bucket, prefix)
        by_kind.setdefault(kind, collections.Counter())[operation] += 1
        methods[method] += 1
    return {
        "total": len(log),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "by_method": dict(methods),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "chunks_written": by_kind.get("chunk", {}).get("PUT", 0) + by_kind.get("chunk", {}).get("write", 0),
        "chunks_read": by_kind.get("chunk", {}).get("GET", 0) + by_kind.get("chunk", {}).get("read", 0),
    }


def _format_counts(label: str, counts: dict[str, Any], per: str = "") -> list[str]:
    kinds = "; ".join(
        f"{kind} " + " ".join(f"{op}:{n}" for op, n in sorted(ops.items()))
        for kind, ops in counts["by_kind"].items()
    )
    methods = " ".join(f"{m}:{n}" for m, n in sorted(counts["by_method"].items()))
    statuses = " ".join(f"{code}:{n}" for code, n in counts["statuses"].items())
    lines = [f"{label}: {counts['total']} requests ({methods}; answers {statuses})", f"    by kind: {kinds}"]
    if per:
        lines.append(f"    {per}")
    return lines


def count_s3_requests(server_url: str, bucket: str, args) -> dict[str, Any]:
    """Requests per jckpt save (and restore) on S3, counted by a recording proxy."""
    states = _states_module()
    results: dict[str, Any] = {}
    previous = os.environ["AWS_ENDPOINT_URL"]
    with counting_proxy(server_url) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        try:
            for scenario in args.scenarios:
                abstract = states.abstract_state(scenario)
                _count_scenario(proxy, results, scenario, bucket, abstract, states.build_state(abstract))
        finally:
            os.environ["AWS_ENDPOINT_URL"] = previous
    return results


def _count_scenario(proxy, results: dict[str, Any], scenario: str, bucket: str, abstract, state) -> None:
    import jax

    import jckpt

    def counted(label: str, url: str, action, *action_args, **kwargs) -> None:
        _reset(proxy)
        action(*action_args, **kwargs)
        counts = breakdown(list(proxy.log), url, dict(proxy.statuses))
        assert counts["total"] == proxy.total, (counts["total"], proxy.total)
        results[label] = counts

    root = f"s3://{bucket}/requests-{scenario}"
    counted(f"{scenario}: save into a fresh root", root, jckpt.save, root, state, step=1)
    held = 3 if scenario == "b" else 1
    for step in range(2, held + 1):
        jckpt.save(root, state, step=step)
    label = f"{scenario}: save into a root holding {held} step(s)"
    counted(label, root, jckpt.save, root, state, step=held + 1)
    label = f"{scenario}: restore (latest step)"
    counted(label, root, lambda: jax.block_until_ready(jckpt.restore(root, like=abstract)))
    empty_prefix(root)
    if scenario == "b":
        root = f"s3://{bucket}/requests-manager"
        with jckpt.CheckpointManager(root, async_save=False) as manager:
            manager.save(1, state)
            counted(f"{scenario}: CheckpointManager.save, 2nd save", root, manager.save, 2, state)
        empty_prefix(root)


def count_gcs_requests(server_url: str, bucket: str, args, contenders: list[str]) -> dict[str, Any]:
    """Requests per save on the GCS emulator: jckpt and Orbax, each save in a fresh process."""
    results: dict[str, Any] = {}
    previous = os.environ["STORAGE_EMULATOR_HOST"]
    with counting_proxy(server_url) as proxy:
        os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
        try:
            for scenario in args.scenarios:
                for contender in contenders:
                    if contender != "jckpt" and scenario not in args.gcs_scenarios:
                        continue  # Orbax: only where it is timed too (see --gcs-scenarios)
                    url = f"gs://{bucket}/requests-{scenario}-{contender}"
                    _reset(proxy)
                    job = {"contender": contender, "scenario": scenario, "url": url, "count_save": True}
                    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
                    env = {**os.environ, "TENSORSTORE_GCS_HTTP_URL": proxy.url}
                    proc = subprocess.run(
                        command, capture_output=True, text=True, timeout=WORKER_TIMEOUT, env=env
                    )
                    label = f"{scenario}: {contender} save into a fresh root"
                    failure = _worker_failure(proc)
                    if failure:
                        results[label] = {"failed": failure, **breakdown(list(proxy.log), url, {})}
                        continue
                    results[label] = breakdown(list(proxy.log), url, dict(proxy.statuses))
                    with contextlib.suppress(Exception):
                        empty_prefix(url)
        finally:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
    return results


def save_worker_main(job: dict[str, Any]) -> dict[str, Any]:
    """One untimed save in a fresh process (the GCS request counts: gcsfs caches its endpoint per process)."""
    states = _states_module()
    abstract = states.abstract_state(job["scenario"])
    state = states.build_state(abstract)
    if job["contender"] == "jckpt":
        import jckpt

        def save(url, tree):
            jckpt.save(url, tree, step=1)
    else:
        ckptr = _orbax_checkpointer(job["contender"])

        def save(url, tree):
            ckptr.save(url, tree)
            if hasattr(ckptr, "wait_until_finished"):
                ckptr.wait_until_finished()

    if job.get("timed"):
        save(job["url"] + "-warm", _tiny_state())
        empty_prefix(job["url"] + "-warm")
    start = time.perf_counter()
    save(job["url"], state)
    return {"seconds": time.perf_counter() - start}


def report_requests(results: dict[str, Any]) -> str:
    lines = []
    for label, counts in results.items():
        if "failed" in counts:
            lines.append(f"{label}: FAILED after {counts.get('total', '?')} requests: {counts['failed']}")
            continue
        per = ""
        chunks = counts["chunks_written"] or counts["chunks_read"]
        if chunks:
            verb = "written" if counts["chunks_written"] else "read"
            fixed = counts["total"] - chunks
            per = (
                f"{chunks} chunks {verb}: {counts['total'] / chunks:.2f} requests per chunk "
                f"({fixed} requests besides the chunks themselves)"
            )
        lines += _format_counts(label, counts, per)
    return "\n".join(lines)


# --------------------------------------------------------------------------- servers
_GCS_LAUNCHER = """
import sys
from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main

_parse = server.RequestHandler.parse_request


def parse_request(self):  # answer "Expect: 100-continue" (HTTP/1.0 handlers never do; curl waits 1 s)
    ok = _parse(self)
    if ok and self.headers.get("Expect", "").lower() == "100-continue":
        self.wfile.write(b"HTTP/1.1 100 Continue\\r\\n\\r\\n")
        self.wfile.flush()
    return ok


server.RequestHandler.parse_request = parse_request
server.server.HTTPServer.request_queue_size = 256  # listen backlog (http.server's default: 5)
sys.exit(main(sys.argv[1:]))
"""


def start_gcs_emulator(log_dir: str):
    """gcp-storage-emulator (in memory) on a free port, answering ``Expect: 100-continue``."""
    import servers

    port = servers.free_port()
    command = [sys.executable, "-c", _GCS_LAUNCHER, "start", "--host", servers.HOST, "--port", str(port),
               "--in-memory"]  # fmt: skip
    url = f"http://{servers.HOST}:{port}"
    log = os.path.join(log_dir, f"gcs-{port}.log")
    return servers._start("gcs", command, url, "/storage/v1/b", log, dict(os.environ), 60.0)


def _disable_soft_delete(url: str, bucket: str) -> None:
    """Turns soft delete off (retention 0, as on GCS), so deleted objects are really gone.

    The emulator enables it by default (7 days, like GCS) and keeps every deleted
    object, and it rewrites the metadata of all objects, deleted ones included, on
    every write: later runs would get slower and slower.
    """
    import urllib.request

    body = json.dumps({"softDeletePolicy": {"retentionDurationSeconds": "0"}}).encode()
    headers = {"Content-Type": "application/json"}
    target = f"{url}/storage/v1/b/{bucket}"
    request = urllib.request.Request(target, data=body, method="PATCH", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = json.loads(response.read())
    assert reply["softDeletePolicy"]["retentionDurationSeconds"] == "0", reply


def _set_up_contenders(backend: str, contenders: list[str], args, bucket: str, endpoint) -> dict[str, Any]:
    """Creates every contender and its tiny warm-up save (which restore workers warm up on)."""
    scheme = "s3" if backend == "s3" else "gs"
    warm = {"savers": {}, "urls": {}}
    for contender in contenders:
        saver = Saver(contender, args, endpoint)
        url = f"{scheme}://{bucket}/warm-{contender}"
        saver.warm_up(url)
        warm["savers"][contender], warm["urls"][contender] = saver, url
    return warm


def run_s3(args, logs: str, out: dict[str, Any]) -> None:
    import servers

    server = servers.start_moto(logs)
    try:
        os.environ.update(servers.s3_environment(server.url))
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            os.environ.pop(name, None)
        bucket = servers.new_bucket_name("bench")
        server.create_bucket(bucket)
        if args.runs and args.s3_contenders:
            warm = _set_up_contenders("s3", args.s3_contenders, args, bucket, server.url)
            for scenario in args.scenarios:
                print(f"S3 (moto {server.url}), scenario {scenario}", flush=True)
                summary = bench_scenario("s3", scenario, args, args.s3_contenders, bucket, server.url, warm)
                out["timings"].append(summary)
                print(report(summary), flush=True)
        if args.requests:
            print("S3: requests per save (jckpt, through the counting proxy)", flush=True)
            counts = count_s3_requests(server.url, bucket, args)
            out["requests_s3"] = counts
            print(report_requests(counts), flush=True)
    finally:
        server.stop()


def run_gcs(args, logs: str, out: dict[str, Any]) -> None:
    import servers

    server = start_gcs_emulator(logs)
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = f"{servers.HOST}:{server.port}"
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url  # for Orbax; jckpt sets it itself
        bucket = servers.new_bucket_name("bench")
        server.create_bucket(bucket)
        _disable_soft_delete(server.url, bucket)
        if args.runs and args.gcs_contenders:
            warm = _set_up_contenders("gcs", args.gcs_contenders, args, bucket, server.url)
            for scenario in args.gcs_scenarios:
                print(f"GCS (gcp-storage-emulator {server.url}), scenario {scenario}", flush=True)
                summary = bench_scenario("gcs", scenario, args, args.gcs_contenders, bucket, server.url, warm)
                out["timings"].append(summary)
                print(report(summary), flush=True)
            for saver in warm["savers"].values():
                saver.close()
        if args.requests:
            print("GCS: requests per save (jckpt and Orbax, through the counting proxy)", flush=True)
            who = [c for c in args.gcs_contenders if c == "jckpt" or c.startswith("orbax")] or ["jckpt"]
            counts = count_gcs_requests(server.url, bucket, args, who)
            out["requests_gcs"] = counts
            print(report_requests(counts), flush=True)
    finally:
        server.stop()


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 run, no boto3-mpu / orbax-nocomp / orbax-ocdbt (~2 minutes)")
    parser.add_argument("--scenarios", default="a,b", help="comma-separated: a (768 MiB), b (2,000 x 1 KiB)")
    parser.add_argument("--runs", type=int, default=None, help="alternating runs (default 3; --quick 1)")
    parser.add_argument("--s3-contenders", default=None,
                        help=f"default {','.join(S3_CONTENDERS)}; '' skips S3 timings")
    parser.add_argument("--gcs-contenders", default=None,
                        help=f"default {','.join(GCS_CONTENDERS)}; '' skips GCS timings")
    parser.add_argument("--gcs-scenarios", default="a",
                        help="scenarios timed on GCS (default a: one Orbax save of b takes minutes there)")
    parser.add_argument("--no-requests", dest="requests", action="store_false",
                        help="skip the request counts")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (raw paths)")
    parser.add_argument("--part-mib", type=int, default=16, help="boto3 multipart part size (MiB)")
    parser.add_argument("--json", help="also write every number here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.update(LOOPBACK_ONLY_ENV)  # before anything imports a Google client (workers inherit it)

    if args.worker:
        job = json.loads(args.worker)
        result = save_worker_main(job) if job.get("count_save") else worker_main(job)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.runs is None:
        args.runs = 1 if args.quick else 3
    quick_drop = {"boto3-mpu", "orbax-nocomp", "orbax-ocdbt", "jckpt-bytegroup"} if args.quick else set()
    s3 = args.s3_contenders if args.s3_contenders is not None else ",".join(S3_CONTENDERS)
    gcs = args.gcs_contenders if args.gcs_contenders is not None else ",".join(GCS_CONTENDERS)
    args.s3_contenders = [c for c in s3.split(",") if c and c not in quick_drop]
    args.gcs_contenders = [c for c in gcs.split(",") if c and c not in quick_drop]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.gcs_scenarios = [s for s in args.gcs_scenarios.split(",") if s in args.scenarios]
    for c in args.s3_contenders + args.gcs_contenders:
        if c not in S3_CONTENDERS + GCS_CONTENDERS:
            parser.error(f"unknown contender {c!r}")
    bad = [c for c in args.gcs_contenders if c.startswith("boto3")]
    if bad:
        parser.error(f"{bad}: boto3 speaks S3 only")

    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "timings": [],
    }
    print(f"{out['date']}: {out['command']}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the servers
    meter = LoadMeter()
    logs = tempfile.mkdtemp(prefix="jckpt-objstore-bench-logs-")
    with quiet_aws_logs():
        try:
            if args.s3_contenders or args.requests:
                run_s3(args, logs, out)
            if args.gcs_contenders or args.requests:
                run_gcs(args, logs, out)
        finally:
            shutil.rmtree(logs, ignore_errors=True)
    out["load"] = load = meter.finish()
    print(
        f"load: loadavg {load['loadavg_before']} before, {load['loadavg_after']} after; over the "
        f"{load['wall_s']:.0f} s run the {load['cpus']} CPUs were {load['busy_share']:.0%} busy, "
        f"{load['others_share']:.0%} of them with other processes' work",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
