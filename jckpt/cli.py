"""The ``jckpt`` command: inspect, verify, compare, tag, export, import and clean checkpoint roots.

::

    jckpt ls ROOT [--json] [--all]           committed steps: kind, sizes, date, tags, metrics
    jckpt info ROOT [--step S] [--json]      one step: metrics, metadata, lineage, every leaf
    jckpt verify ROOT [--step S | --all]     re-read every chunk and check its hash
    jckpt diff ROOT A B [--root-b ROOT2]     per leaf: added, removed, reshaped, max|a-b|, rel L2
    jckpt rm ROOT STEP... [--dry-run]        delete steps (bytes other steps need survive)
    jckpt gc ROOT [--dry-run]                remove unreferenced and uncommitted data
    jckpt tag ROOT STEP NAME [--force]       name a step ("prod"); retention never deletes it
    jckpt untag ROOT NAME / jckpt tags ROOT
    jckpt export ROOT DEST [--format F]      safetensors (HF layout), npz or orbax
    jckpt import SOURCE ROOT --step N        from Orbax, safetensors or npz

A step S may be a number or a tag name.  ROOT may be a path, ``s3://BUCKET/PREFIX`` or
``gs://BUCKET/PREFIX``.  Every command exits 0 on success; on an error it prints one line
to stderr, ``jckpt <command>: <ErrorType>: <message>``, and exits 1 (2 for a usage error;
``jckpt diff`` exits 1 when the steps differ, as diff(1) does).  ``--debug`` (before or
after the command) prints the traceback as well.  jax is imported only by commands that
need it, so ``jckpt --help`` answers at once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import jckpt

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MANAGER_METADATA = "jckpt"  # jckpt.policy.META_KEY: where CheckpointManager keeps its policy state


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


def _step_or_tag(text: str) -> int | str:
    """A step number, or a tag name (a letter first)."""
    if text[:1].isalpha():
        return text
    return _step(text)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def _size_arg(text: str) -> str:
    """A size such as ``100KB``, ``5GB`` or ``512MiB`` (checked here, parsed by the exporter)."""
    if not _SIZE.match(text):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: e.g. 100KB, 5GB, 512MiB or 1000000")
    return text


def _check_root(directory: str) -> None:
    """Refuses, with a one-line error, a local path that is missing, a file or not a jckpt root.

    (The API treats a missing root as "no checkpoints"; on the command line a
    typo must not look like an empty root.)  Object-store roots are left to the API.
    """
    if "://" in directory and not directory.startswith("file://"):
        return
    path = directory[len("file://") :] if directory.startswith("file://") else directory
    if not os.path.exists(path):
        raise jckpt.CheckpointNotFoundError(f"{directory!r}: no such directory")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{directory!r} is a file, not a checkpoint root")
    if not os.path.exists(os.path.join(path, "jckpt.json")):
        what = "an empty directory" if not os.listdir(path) else "a directory without jckpt.json"
        raise jckpt.CheckpointNotFoundError(f"{directory!r} is not a jckpt checkpoint root ({what})")


# ----------------------------------------------------------------- formatting


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def _number(value: Any) -> str:
    """A metric: 4 significant digits for floats."""
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def _metrics(metrics: dict | None) -> str:
    return "  ".join(f"{k}={_number(v)}" for k, v in (metrics or {}).items())


def _date(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")


def _user_metadata(metadata: Any, show_all: bool) -> Any:
    """The user's metadata: the manager's policy state is internal and hidden unless ``show_all``."""
    if show_all or not isinstance(metadata, dict):
        return metadata
    return {k: v for k, v in metadata.items() if k != MANAGER_METADATA}


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, disable_numparse=True)


SIZES_NOTE = (
    "written: bytes this save wrote (an incremental save reuses the rest; packed small leaves are\n"
    "64-byte aligned, so a full save writes slightly more than total). total: the step's logical size."
)


def _info_json(info, tags: list[str], show_all: bool) -> dict[str, Any]:
    doc = info._asdict()
    doc["metadata"] = _user_metadata(doc["metadata"], show_all)
    doc["created_iso"] = _date(info.created)
    doc["tags"] = tags
    return doc


def _tags_by_step(root: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, step in jckpt.tags(root).items():
        out.setdefault(step, []).append(name)
    return out


# ----------------------------------------------------------------- commands


def _ls(args) -> None:
    _check_root(args.root)
    tags = _tags_by_step(args.root)
    infos = [jckpt.info(args.root, step) for step in jckpt.all_steps(args.root)]
    if args.json:
        print(json.dumps([_info_json(i, tags.get(i.step, []), args.all) for i in infos], indent=1))
        return
    host = any(i.host_states for i in infos)  # a column only for roots that hold host states
    rows = [
        [
            i.step,
            i.kind if i.base_step is None else f"{i.kind} (base {i.base_step})",
            _size(i.bytes_written),
            _size(i.bytes_total),
            *([i.host_states] if host else []),
            _date(i.created),
            ",".join(tags.get(i.step, [])),
            _metrics(i.metrics),
        ]
        for i in infos
    ]
    headers = ["step", "kind", "written", "total", *(["host states"] if host else []), "created", "tags"]
    print(_table(rows, [*headers, "metrics"]))
    if rows:
        print("\n" + SIZES_NOTE)


def _info(args) -> None:
    _check_root(args.root)
    from jckpt import api
    from jckpt import format as fmt

    root, manifest = api.open_step(args.root, args.step)
    info = manifest.info()
    tags = _tags_by_step(args.root).get(info.step, [])
    leaves = [
        {
            "path": leaf.path,
            "dtype": leaf.extra["host_type"] if leaf.storage == fmt.HOST else leaf.dtype or "None",
            "shape": list(leaf.shape),
            "storage": leaf.storage,
            "chunks": len(leaf.chunks) if leaf.storage == fmt.CHUNKED
            else len(leaf.states) if leaf.storage == fmt.HOST else len(leaf.pieces),
            "nbytes": leaf.nbytes,
        }
        for leaf in manifest.leaves
    ]
    if args.json:
        print(json.dumps({**_info_json(info, tags, args.all), "leaves": leaves}, indent=1))
        return
    base = f" (base {info.base_step})" if info.base_step is not None else ""
    print(f"step      {info.step}{'  tags ' + ','.join(tags) if tags else ''}")
    print(f"kind      {info.kind}{base}, compression {manifest.compression or 'none'}")
    print(f"created   {_date(info.created)}, save took {info.save_seconds:.3g} s")
    print(f"size      {_size(info.bytes_total)} total, {_size(info.bytes_written)} written by this save")
    print(f"metrics   {_metrics(info.metrics) or '-'}")
    if info.host_states:
        print(f"host      {info.host_states} host state(s) (data iterators, RNGs), one per process")
    metadata = _user_metadata(info.metadata, args.all)
    print(f"metadata  {json.dumps(metadata) if metadata else '-'}")
    lineage = info.lineage or {}
    for key in ("origin", "versions", "host", "command", "git_commit", "process_count", "device_kind"):
        if lineage.get(key) not in (None, "", [], {}):
            value = lineage[key]
            if key == "versions":
                value = " ".join(f"{k} {v}" for k, v in value.items())
            elif key == "command":
                value = " ".join(value)
            elif key == "device_kind":
                value = f"{value} x{lineage.get('device_count')}, meshes {lineage.get('mesh_shapes')}"
            print(f"{key:<9} {value}")
    rows = [
        [x["path"], x["dtype"], x["shape"] if x["storage"] not in ("none", "host") else "", x["storage"],
         x["chunks"], _size(x["nbytes"])]
        for x in leaves
    ]
    print()
    print(_table(rows, ["leaf", "dtype", "shape", "storage", "chunks/pieces", "size"]))


def _verify(args) -> None:
    _check_root(args.root)
    steps = jckpt.all_steps(args.root) if args.all else [jckpt.info(args.root, args.step).step]
    failed = []
    for step in steps:
        try:
            jckpt.verify(args.root, step, progress=None)
        except Exception as e:  # report every bad step, then fail
            if not args.all:
                raise
            failed.append(step)
            print(f"step {step}: FAILED: {_one_line(e)}", flush=True)
        else:
            print(f"step {step}: ok", flush=True)
    if failed:
        raise jckpt.CorruptCheckpointError(f"{len(failed)} of {len(steps)} steps failed to verify: {failed}")


def _diff(args) -> int:
    _check_root(args.root)
    if args.root_b:
        _check_root(args.root_b)
    report = jckpt.diff(args.root, args.a, args.b, directory_b=args.root_b)
    differ = [d for d in report if d.status != "same"]
    if args.json:
        print(json.dumps([d._asdict() for d in report], indent=1))
    elif not differ:
        print(f"identical: {len(report)} leaves")
    else:
        rows = [
            [d.path, d.status, d.a, d.b, "" if d.max_abs is None else f"{d.max_abs:.4g}",
             "" if d.rel_l2 is None else f"{d.rel_l2:.4g}"]
            for d in differ
        ]
        print(_table(rows, ["leaf", "status", f"A ({args.a})", f"B ({args.b})", "max|a-b|", "rel L2"]))
        print(f"\n{len(differ)} of {len(report)} leaves differ")
    return EXIT_ERROR if differ else 0


def _rm(args) -> None:
    _check_root(args.root)
    if args.dry_run:
        from jckpt import gc
        from jckpt.root import Root

        committed = set(jckpt.all_steps(args.root))
        missing = [s for s in args.steps if s not in committed]
        if missing:
            raise jckpt.CheckpointNotFoundError(f"no committed step(s) {missing} at {args.root!r}")
        tagged = {s: names for s, names in _tags_by_step(args.root).items() if s in args.steps}
        if tagged:
            raise jckpt.StepTaggedError(f"tagged, would be refused: {tagged}")
        freed = gc.freed_by(Root(args.root), args.steps)
        print(f"would delete steps {args.steps}, reclaiming {len(freed)} files (other steps keep the rest)")
        return
    for step in args.steps:
        jckpt.delete(args.root, step)
        print(f"deleted step {step}")


def _gc(args) -> None:
    _check_root(args.root)
    from jckpt import gc, progress
    from jckpt.root import Root

    root = Root(args.root)
    root.check_version()
    with progress.bar("gc: listing and reading manifests", None):  # a spinner, on a terminal only
        leftovers = gc.remove_uncommitted(root, dry_run=args.dry_run)
        files = gc.collect(root, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(leftovers)} uncommitted data directories and {len(files)} unreferenced files")


def _tag(args) -> None:
    _check_root(args.root)
    jckpt.tag(args.root, args.step, args.name, force=args.force)
    print(f"{args.name} -> step {jckpt.tags(args.root)[args.name]}")


def _untag(args) -> None:
    _check_root(args.root)
    jckpt.untag(args.root, args.name)
    print(f"removed tag {args.name}")


def _tags(args) -> None:
    _check_root(args.root)
    tags = jckpt.tags(args.root)
    if args.json:
        print(json.dumps(tags, indent=1))
    else:
        print(_table([[name, step] for name, step in tags.items()], ["tag", "step"]) if tags else "no tags")


def _export(args) -> None:
    _check_root(args.root)
    exported = jckpt.export(
        args.root,
        args.destination,
        step=args.step,
        format=args.format,
        select=args.select,
        max_shard_size=args.max_shard_size,
        progress=None,
    )
    print(
        f"exported step {exported.step} as {exported.format}: {len(exported.names)} tensors, "
        f"{_size(exported.nbytes)} in {len(exported.files)} file(s) at {exported.destination}"
    )


def _import(args) -> None:
    info = jckpt.import_from(args.source, args.root, step=args.step, format=args.format, progress=None)
    print(f"imported step {info.step} ({_size(info.bytes_total)}): {info.lineage.get('origin', '')}")


def _one_line(error: BaseException) -> str:
    """``ErrorType: message`` on one line (multi-line messages joined with "; ")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {'; '.join(lines)}" if lines else type(error).__name__


def parser() -> argparse.ArgumentParser:
    """The ``jckpt`` argument parser (each command sets ``run``)."""
    top = _Parser(
        prog="jckpt",
        description="Inspect, verify, compare, tag, export, import and clean jckpt checkpoint roots.",
        epilog="A step may be a number or a tag name. ROOT: a path, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX.",
    )
    top.add_argument("--version", action="version", version=f"jckpt {jckpt.__version__}")
    top.add_argument("--debug", action="store_true", help="print the traceback of an error")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name, run, help, root=True):
        sub = commands.add_parser(name, help=help, description=help)
        if root:
            sub.add_argument("root", metavar="ROOT", help="checkpoint root: a path, s3://... or gs://...")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(run=run)
        return sub

    def json_and_all(sub):
        sub.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of a table")
        sub.add_argument("--all", action="store_true", help="also show the manager's policy metadata")

    json_and_all(command("ls", _ls, "list committed steps: kind, sizes, date, tags, metrics"))
    info = command("info", _info, "describe one step: metrics, metadata, lineage and every leaf")
    info.add_argument("--step", type=_step_or_tag, help="step number or tag (default: the latest)")
    json_and_all(info)
    verify = command("verify", _verify, "re-read every chunk and check its hash")
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--step", type=_step_or_tag, help="step number or tag (default: the latest)")
    which.add_argument("--all", action="store_true", help="verify every committed step")
    diff = command("diff", _diff, "compare two steps leaf by leaf (exit 1 when they differ)")
    diff.add_argument("a", metavar="A", type=_step_or_tag, help="step number or tag in ROOT")
    diff.add_argument("b", metavar="B", type=_step_or_tag, help="step number or tag (in ROOT, or --root-b)")
    diff.add_argument("--root-b", help="the root holding B, to compare two runs (default: ROOT)")
    diff.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of a table")
    rm = command("rm", _rm, "delete steps (bytes other steps need survive)")
    rm.add_argument("steps", metavar="STEP", type=_step, nargs="+", help="step numbers to delete")
    rm.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    gc = command("gc", _gc, "remove unreferenced and uncommitted data")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    tag = command("tag", _tag, "name a step; retention never deletes a tagged step")
    tag.add_argument("step", metavar="STEP", type=_step_or_tag, help="step number (or an existing tag)")
    tag.add_argument("name", metavar="NAME", help="tag name: a letter, then letters, digits, '.', '_' or '-'")
    tag.add_argument("--force", action="store_true", help="move the tag if it names another step")
    command("untag", _untag, "remove a tag").add_argument("name", metavar="NAME", help="the tag to remove")
    command("tags", _tags, "list tags").add_argument("--json", action="store_true", help="print JSON")
    export = command("export", _export, "export a step to safetensors (HF layout), npz or orbax")
    export.add_argument("destination", metavar="DEST", help="new directory (safetensors, orbax) or .npz")
    export.add_argument("--step", type=_step_or_tag, help="step number or tag (default: the latest)")
    export.add_argument("--format", default="safetensors", choices=["safetensors", "npz", "orbax"],
                        help="the format to write (default: safetensors)")
    export.add_argument("--select", help="fnmatch pattern over tensor names, e.g. 'params.*'")
    export.add_argument("--max-shard-size", default="5GB", type=_size_arg,
                        help="safetensors shard size, e.g. 100KB, 5GB (default: 5GB)")
    imp = command("import", _import, "import Orbax, safetensors or npz as one step", root=False)
    imp.add_argument("source", metavar="SOURCE", help="Orbax checkpoint, .safetensors or HF dir, .npz")
    imp.add_argument("root", metavar="ROOT", help="the jckpt root to write (created if missing)")
    imp.add_argument("--step", type=_step, required=True, help="the step number to write")
    imp.add_argument(
        "--format", choices=["orbax", "safetensors", "npz"], help="the source format (default: detected)"
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status.

    0 ok, 1 an error (or ``diff`` found a difference), 2 a usage error, 130 interrupted.

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
        return args.run(args) or 0
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


if __name__ == "__main__":
    sys.exit(main())
