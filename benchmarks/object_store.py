"""Object-store benchmark: jckpt on S3 (a local moto server) vs the best raw paths to the same server.

Run ``python benchmarks/object_store.py`` (``--help`` for options); needs the
``test`` extra (moto_server) and boto3 (``bench`` extra).  A skeleton of the
issue-8 benchmark: the figures it prints belong in docs/benchmarks.md.

Method
------
* One ``moto_server`` on 127.0.0.1 (started here, stopped at the end); every
  contender writes the same bytes into its own prefix of one bucket, which is
  emptied (exact deletes) after each run so moto's memory stays bounded.
* Scenarios (the states of ``benchmarks/save_restore.py``): (a) the ~768 MiB
  train state, params + Adam mu/nu, 194 float32 leaves; (b) 2,000 leaves of 1 KiB.
* Contenders, interleaved run by run in a rotated order, medians reported:

  - ``jckpt``: ``jckpt.save(s3://...)`` (returns after the manifest PUT, the
    commit) and ``jckpt.restore(s3://..., like=abstract)`` (jax arrays).
  - ``ts-raw``: tensorstore's s3 kvstore writing the same bytes -- each leaf
    cut into pieces of jckpt's chunk size (16 MiB), every piece a PUT, all in
    flight at once under ``--concurrency`` -- then reading them back.
  - ``boto3``: the whole state as one object through boto3's managed
    multipart transfer (``--part-mib`` parts, ``--concurrency`` threads), and
    the managed ranged download back.

* Requests per save: one more jckpt save of each scenario through
  ``tests/faultproxy.py`` (no faults), counting requests by method.  Target
  (issue 8): <= 10 requests for the 2,000 small leaves, about one request per
  chunk for large leaves.
* Ratios: jckpt time / best raw time (lower is better); target jckpt
  throughput >= 0.8x the best raw path, i.e. a time ratio <= 1.25.

All numbers come from one machine and one moto process (pure Python): moto's
own speed bounds every contender, so the ratios say more than the absolute
throughputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
# A script's folder comes first on sys.path, where a sibling benchmark could shadow a module jax imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.join(_REPO, "tests"))  # servers.py, faultproxy.py

MiB = 2**20
CHUNK_BYTES = 16 * MiB
CONTENDERS = ("jckpt", "ts-raw", "boto3")


def _load_states_module():
    """benchmarks/save_restore.py (its states), imported by path so the folder stays off sys.path."""
    spec = importlib.util.spec_from_file_location(
        "_save_restore_bench", os.path.join(_HERE, "save_restore.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaf_bytes(state) -> list[tuple[str, bytes]]:
    """(name, bytes) of every leaf, in tree order."""
    import jax
    import numpy as np

    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return [(jax.tree_util.keystr(path), np.asarray(leaf).tobytes()) for path, leaf in flat]


def _pieces(leaves: list[tuple[str, bytes]]) -> list[tuple[str, memoryview]]:
    """Each leaf cut into CHUNK_BYTES pieces, keyed ``leaf<i>/<piece>``."""
    out = []
    for i, (_, data) in enumerate(leaves):
        view = memoryview(data)
        for j, start in enumerate(range(0, max(len(data), 1), CHUNK_BYTES)):
            out.append((f"leaf{i:05d}/{j}", view[start : start + CHUNK_BYTES]))
    return out


# --------------------------------------------------------------------------- contenders
def run_jckpt(root: str, state, abstract) -> tuple[float, float]:
    import jax

    import jckpt

    start = time.perf_counter()
    jckpt.save(root, state, step=1)
    saved = time.perf_counter() - start
    start = time.perf_counter()
    restored = jax.block_until_ready(jckpt.restore(root, like=abstract))
    loaded = time.perf_counter() - start
    del restored
    return saved, loaded


def run_ts_raw(root: str, pieces: list[tuple[str, memoryview]], concurrency: int) -> tuple[float, float]:
    from jckpt import storage

    spec = storage.kvstore_spec(root)
    kv = storage.open_kvstore(spec, storage.context(request_concurrency=concurrency))
    start = time.perf_counter()
    for future in [kv.write(key, bytes(value)) for key, value in pieces]:
        future.result()
    saved = time.perf_counter() - start
    start = time.perf_counter()
    values = [future.result().value for future in [kv.read(key) for key, _ in pieces]]
    loaded = time.perf_counter() - start
    assert sum(map(len, values)) == sum(len(v) for _, v in pieces)
    return saved, loaded


def run_boto3(
    endpoint: str, bucket: str, key: str, blob: bytes, concurrency: int, part_mib: int
) -> tuple[float, float]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    config = TransferConfig(
        multipart_threshold=part_mib * MiB,
        multipart_chunksize=part_mib * MiB,
        max_concurrency=concurrency,
        use_threads=True,
    )
    start = time.perf_counter()
    client.upload_fileobj(io.BytesIO(blob), bucket, key, Config=config)
    saved = time.perf_counter() - start
    out = io.BytesIO()
    start = time.perf_counter()
    client.download_fileobj(bucket, key, out, Config=config)
    loaded = time.perf_counter() - start
    assert out.getbuffer().nbytes == len(blob)
    return saved, loaded


def empty_prefix(root: str) -> None:
    """Deletes every key under ``root`` (listed, then exact deletes)."""
    from jckpt import storage

    spec = storage.kvstore_spec(root)
    kv = storage.open_kvstore(spec, storage.context())
    storage.delete_keys(kv, storage.list_keys(kv))


def count_requests(server_url: str, bucket: str, state) -> dict[str, int]:
    """HTTP requests (by method) of one jckpt save, counted by a fault-free proxy."""
    from faultproxy import FaultProxy

    import jckpt

    with FaultProxy(server_url) as proxy:
        previous = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        try:
            root = f"s3://{bucket}/requests"
            jckpt.save(root, state, step=1)
            counts = dict(proxy.counts)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = previous
    empty_prefix(f"s3://{bucket}/requests")
    return counts


# --------------------------------------------------------------------------- driver
def bench_scenario(scenario: str, args, server, bucket: str) -> dict[str, Any]:
    import jax

    states = _load_states_module()
    abstract = states.abstract_state(scenario)
    state = states.build_state(abstract)
    nbytes = states.state_nbytes(abstract)
    leaves = _leaf_bytes(state)
    pieces = _pieces(leaves)
    blob = b"".join(data for _, data in leaves) if "boto3" in args.contenders else b""
    times: dict[str, dict[str, list[float]]] = {c: {"save": [], "restore": []} for c in args.contenders}

    # Warm up every path once (imports, connections, tensorstore contexts), untimed.
    small = jax.tree.map(lambda x: x[:1] if getattr(x, "ndim", 0) else x, state)
    run_jckpt(f"s3://{bucket}/warm", small, jax.eval_shape(lambda: small))
    empty_prefix(f"s3://{bucket}/warm")

    for run in range(args.runs):
        order = list(args.contenders[run % len(args.contenders) :]) + list(
            args.contenders[: run % len(args.contenders)]
        )
        for contender in order:
            root = f"s3://{bucket}/{scenario}-{contender}-{run}"
            if contender == "jckpt":
                saved, loaded = run_jckpt(root, state, abstract)
            elif contender == "ts-raw":
                saved, loaded = run_ts_raw(root, pieces, args.concurrency)
            else:
                key = f"{scenario}-{contender}-{run}/state.bin"
                saved, loaded = run_boto3(server.url, bucket, key, blob, args.concurrency, args.part_mib)
            times[contender]["save"].append(saved)
            times[contender]["restore"].append(loaded)
            empty_prefix(root)
            print(f"  run {run} {contender:7s} save {saved:7.3f} s  restore {loaded:7.3f} s", flush=True)

    summary: dict[str, Any] = {
        "scenario": scenario,
        "bytes": nbytes,
        "leaves": len(leaves),
        "pieces": len(pieces),
    }
    for contender, phases in times.items():
        for phase, values in phases.items():
            median = statistics.median(values)
            summary[f"{contender}_{phase}_s"] = median
            summary[f"{contender}_{phase}_MiBps"] = nbytes / MiB / median
    for phase in ("save", "restore"):
        raws = [summary[f"{c}_{phase}_s"] for c in args.contenders if c != "jckpt"]
        if "jckpt" in args.contenders and raws:
            summary[f"{phase}_ratio_vs_best_raw"] = summary[f"jckpt_{phase}_s"] / min(raws)
    if "jckpt" in args.contenders:
        summary["requests_per_save"] = count_requests(server.url, bucket, state)
    return summary


def report(summary: dict[str, Any], contenders: list[str]) -> str:
    lines = [
        f"scenario {summary['scenario']}: {summary['bytes'] / MiB:.1f} MiB in {summary['leaves']} leaves",
        f"{'contender':10s} {'save s':>9s} {'MiB/s':>8s} {'restore s':>10s} {'MiB/s':>8s}",
    ]
    for c in contenders:
        lines.append(
            f"{c:10s} {summary[f'{c}_save_s']:9.3f} {summary[f'{c}_save_MiBps']:8.1f} "
            f"{summary[f'{c}_restore_s']:10.3f} {summary[f'{c}_restore_MiBps']:8.1f}"
        )
    for phase in ("save", "restore"):
        if f"{phase}_ratio_vs_best_raw" in summary:
            ratio = summary[f"{phase}_ratio_vs_best_raw"]
            lines.append(
                f"jckpt {phase} time / best raw: {ratio:.2f} (target <= 1.25, i.e. >= 0.8x throughput)"
            )
    if "requests_per_save" in summary:
        counts = summary["requests_per_save"]
        lines.append(f"requests per jckpt save: {sum(counts.values())} {counts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="b,a", help="comma-separated: a (768 MiB), b (2,000 x 1 KiB)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (raw paths)")
    parser.add_argument("--part-mib", type=int, default=16, help="boto3 multipart part size")
    parser.add_argument("--json", help="also write the summaries here")
    args = parser.parse_args(argv)
    args.contenders = [c for c in args.contenders.split(",") if c]

    import servers

    logs = tempfile.mkdtemp(prefix="jckpt-objstore-bench-logs-")
    server = servers.start_moto(logs)
    try:
        os.environ.update(servers.s3_environment(server.url))
        bucket = servers.new_bucket_name("bench")
        server.create_bucket(bucket)
        summaries = []
        for scenario in args.scenarios.split(","):
            print(f"scenario {scenario}", flush=True)
            summary = bench_scenario(scenario, args, server, bucket)
            summaries.append(summary)
            print(report(summary, args.contenders), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summaries, f, indent=2)
    finally:
        server.stop()
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
