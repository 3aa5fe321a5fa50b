"""The ``jckpt`` command: inspect, verify, compare and clean checkpoint roots.

::

    jckpt ls ROOT                 committed steps with kind, sizes and metrics
    jckpt info ROOT [--step N]    one step: metadata and every leaf
    jckpt verify ROOT [--step N | --all]
    jckpt diff ROOT A B           leaves whose bytes differ between two steps
    jckpt rm ROOT STEP...         delete steps (bytes other steps need survive)
    jckpt gc ROOT                 remove unreferenced and uncommitted data

Every command exits 0 on success; on an error it prints one line to stderr,
``jckpt <command>: <ErrorType>: <message>``, and exits 1 (2 for a usage error).
``--debug`` (before or after the command) prints the traceback as well.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from collections.abc import Sequence

from tabulate import tabulate

import jckpt
from jckpt import format as fmt
from jckpt import gc
from jckpt import read as read_lib
from jckpt.root import Root

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line arguments (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, so ``main`` formats and returns them)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _step(text: str) -> int:
    """A step argument: a non-negative integer."""
    try:
        step = int(text, 10)
    except ValueError:
        step = -1
    if step < 0:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: steps are integers >= 0")
    return step


def _check_root(directory: str) -> None:
    """Refuses, with a one-line error, a local path that is missing, a file or not a jckpt root.

    (The API treats a missing root as "no checkpoints"; on the command line a
    typo must not look like an empty root.)  Non-local roots are left to the API.
    """
    if "://" in directory and not directory.startswith("file://"):
        return
    path = directory[len("file://") :] if directory.startswith("file://") else directory
    if not os.path.exists(path):
        raise jckpt.CheckpointNotFoundError(f"{directory!r}: no such directory")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{directory!r} is a file, not a checkpoint root")
    if not os.path.exists(os.path.join(path, fmt.ROOT_MARKER)):
        what = "an empty directory" if not os.listdir(path) else f"a directory without {fmt.ROOT_MARKER}"
        raise jckpt.CheckpointNotFoundError(f"{directory!r} is not a jckpt checkpoint root ({what})")


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def _ls(args) -> None:
    _check_root(args.root)
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
    _check_root(args.root)
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
    _check_root(args.root)
    steps = jckpt.all_steps(args.root) if args.all else [jckpt.info(args.root, args.step).step]
    failed = []
    for step in steps:
        try:
            jckpt.verify(args.root, step)
        except Exception as e:  # report every bad step, then fail
            if not args.all:
                raise
            failed.append(step)
            print(f"step {step}: FAILED: {_one_line(e)}", flush=True)
        else:
            print(f"step {step}: ok", flush=True)
    if failed:
        raise jckpt.CorruptCheckpointError(f"{len(failed)} of {len(steps)} steps failed to verify: {failed}")


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
    _check_root(args.root)
    root = Root(args.root)
    a, b = _leaf_fingerprints(root, args.a), _leaf_fingerprints(root, args.b)
    rows = [[path, "only in " + str(args.a if path in a else args.b)] for path in sorted(a.keys() ^ b.keys())]
    rows += [[path, "differs"] for path in sorted(a.keys() & b.keys()) if a[path] != b[path]]
    print(tabulate(rows, headers=["leaf", f"step {args.a} vs {args.b}"]) if rows else "identical")


def _rm(args) -> None:
    _check_root(args.root)
    for step in args.steps:
        jckpt.delete(args.root, step)
        print(f"deleted step {step}")


def _gc(args) -> None:
    _check_root(args.root)
    root = Root(args.root)
    root.check_version()
    leftovers = gc.remove_uncommitted(root)
    files = gc.collect(root)
    print(f"removed {len(leftovers)} uncommitted data directories and {files} unreferenced files")


def _one_line(error: BaseException) -> str:
    """``ErrorType: message`` on one line (multi-line messages joined with "; ")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {'; '.join(lines)}" if lines else type(error).__name__


def parser() -> argparse.ArgumentParser:
    """The ``jckpt`` argument parser (each command sets ``run``)."""
    top = _Parser(prog="jckpt", description=__doc__.split("\n")[0])
    top.add_argument("--debug", action="store_true", help="print the traceback of an error")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, run, help):
        sub = commands.add_parser(name, help=help)
        sub.add_argument("root", help="checkpoint root directory")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(run=run)
        return sub

    command("ls", _ls, "list committed steps")
    command("info", _info, "describe one step").add_argument("--step", type=_step)
    verify = command("verify", _verify, "re-read and check every chunk hash")
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--step", type=_step)
    which.add_argument("--all", action="store_true")
    diff = command("diff", _diff, "leaves that differ between two steps")
    diff.add_argument("a", type=_step)
    diff.add_argument("b", type=_step)
    command("rm", _rm, "delete steps").add_argument("steps", type=_step, nargs="+")
    command("gc", _gc, "reclaim unreferenced and uncommitted data")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (0 ok, 1 error, 2 usage error, 130 interrupted).

    Errors are printed as one line on stderr; with ``--debug`` the traceback comes first.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parser().parse_args(argv)
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"jckpt: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"jckpt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # every error becomes one line (the traceback first with --debug)
        if args.debug:
            traceback.print_exc()
        print(f"jckpt {args.command}: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
