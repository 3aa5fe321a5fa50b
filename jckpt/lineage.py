"""Lineage: where a checkpoint came from, recorded automatically in every manifest.

Versions of jckpt, jax, flax and optax; process count, device kind and count,
the mesh shapes of the saved arrays; host, command line and the git commit
of the working directory (when it is a git checkout).  ``jckpt info`` shows it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import socket
import subprocess
import sys
from typing import Any

import jax


@functools.cache
def _versions() -> dict[str, str]:
    out = {}
    for package in ("jckpt", "jax", "flax", "optax"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@functools.cache
def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    status = ["git", "status", "--porcelain", "-uno"]
    dirty = subprocess.run(status, capture_output=True, text=True, timeout=5, check=False)
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def of_state(state: Any) -> dict[str, Any]:
    """The lineage of saving ``state`` from this process now."""
    meshes = []
    for leaf in jax.tree_util.tree_leaves(state):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        shape = dict(getattr(mesh, "shape", {}) or {})
        if shape and shape not in meshes:
            meshes.append(shape)
    devices = jax.devices()
    return {
        "versions": _versions(),
        "process_count": jax.process_count(),
        "device_kind": devices[0].device_kind if devices else None,
        "device_count": len(devices),
        "mesh_shapes": meshes,
        "host": socket.gethostname(),
        "command": list(sys.argv),
        "git_commit": _git_commit(),
    }
