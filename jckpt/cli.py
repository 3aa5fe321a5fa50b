"""The ``jckpt`` command: inspect, verify, compare and clean checkpoint roots.

::

    jckpt ls ROOT                 committed steps with kind, sizes and metrics
    jckpt info ROOT [--step N]    one step: metadata and every leaf
    jckpt verify ROOT [--step N | --all]
    jckpt diff ROOT A B           leaves whose bytes differ between two steps
    jckpt rm ROOT STEP...         delete steps (bytes other steps need survive)
    jckpt gc ROOT                 remove unreferenced and uncommitted data
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence

from tabulate import tabulate

import jckpt
from jckpt import format as fmt
from jckpt import gc
from jckpt import read as read_lib
from jckpt.root import Root


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def _ls(args) -> None:
    rows = []
    for step in jckpt.all_steps(args.root):
        info = jckpt.info(args.root, step)
        created = datetime.datetime.fromtimestamp(info.created).isoformat(sep=" ", timespec="seconds")
        rows.append(
            [
                step,
                info.kind,
                _size(info.bytes_written),
                _size(info.bytes_total),
                created,
                json.dumps(info.metrics) if info.metrics else "",
            ]
        )
    print(tabulate(rows, headers=["step", "kind", "written", "total", "created", "metrics"]))


def _info(args) -> None:
    root = Root(args.root)
    step = jckpt.info(args.root, args.step).step
    manifest = root.read_manifest(step)
    print(f"step {step}  kind {manifest.kind}  base {manifest.base_step}  compression {manifest.compression}")
    print(f"metrics  {json.dumps(manifest.metrics)}\nmetadata {json.dumps(manifest.metadata)}")
    rows = [
        [
            leaf.path,
            leaf.dtype or "None",
            list(leaf.shape) if leaf.storage != fmt.NONE else "",
            len(leaf.chunks) if leaf.storage == fmt.CHUNKED else leaf.storage,
        ]
        for leaf in manifest.leaves
    ]
    print(tabulate(rows, headers=["leaf", "dtype", "shape", "chunks"]))


def _verify(args) -> None:
    steps = jckpt.all_steps(args.root) if args.all else [jckpt.info(args.root, args.step).step]
    for step in steps:
        jckpt.verify(args.root, step)
        print(f"step {step}: ok")


def _leaf_fingerprints(root: Root, step: int) -> dict[str, object]:
    """Per leaf something equal iff its bytes are: chunk hashes, or the bytes of small packed leaves."""
    manifest = root.read_manifest(step)
    small_leaves = [leaf for leaf in manifest.leaves if leaf.storage == fmt.PACKED]
    small = read_lib.read_to_host(root, manifest, small_leaves)  # small by definition: compared exactly
    prints: dict[str, object] = {p.leaf.path: p.host(p.regions[0]).tobytes() for p in small}
    for leaf in manifest.leaves:
        if leaf.storage == fmt.CHUNKED:
            prints[leaf.path] = sorted((name, digest) for name, (digest, _) in leaf.chunks.items())
        prints[leaf.path] = (leaf.dtype, leaf.shape, prints.get(leaf.path))
    return prints


def _diff(args) -> None:
    root = Root(args.root)
    a, b = _leaf_fingerprints(root, args.a), _leaf_fingerprints(root, args.b)
    rows = [[path, "only in " + str(args.a if path in a else args.b)] for path in sorted(a.keys() ^ b.keys())]
    rows += [[path, "differs"] for path in sorted(a.keys() & b.keys()) if a[path] != b[path]]
    print(tabulate(rows, headers=["leaf", f"step {args.a} vs {args.b}"]) if rows else "identical")


def _rm(args) -> None:
    for step in args.steps:
        jckpt.delete(args.root, step)
        print(f"deleted step {step}")


def _gc(args) -> None:
    root = Root(args.root)
    root.check_version()
    leftovers = gc.remove_uncommitted(root)
    files = gc.collect(root)
    print(f"removed {len(leftovers)} uncommitted data directories and {files} unreferenced files")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jckpt", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, run, help):
        sub = commands.add_parser(name, help=help)
        sub.add_argument("root", help="checkpoint root directory")
        sub.set_defaults(run=run)
        return sub

    command("ls", _ls, "list committed steps")
    command("info", _info, "describe one step").add_argument("--step", type=int)
    verify = command("verify", _verify, "re-read and check every chunk hash")
    verify.add_argument("--step", type=int)
    verify.add_argument("--all", action="store_true")
    diff = command("diff", _diff, "leaves that differ between two steps")
    diff.add_argument("a", type=int)
    diff.add_argument("b", type=int)
    command("rm", _rm, "delete steps").add_argument("steps", type=int, nargs="+")
    command("gc", _gc, "reclaim unreferenced and uncommitted data")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as e:  # jckpt errors subclass these
        print(f"jckpt {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
