"""Tensor names: pytree key paths joined with ".", selection, and nesting names back into trees.

Exported tensors are named by their leaf's key path with the parts joined by
``"."``: ``{"params": {"layers": [{"kernel": w}]}}`` gives
``params.layers.0.kernel``, the convention of Hugging Face safetensors and of
Orbax parameter names.  Imports split names on ``"."`` into nested dicts whose
keys are all strings, numeric parts included (``{"layers": {"0": ...}}``):
a flat file does not say whether ``0`` was a list index or a dict key, and
the jckpt key path of a leaf is the same either way, so ``jckpt.restore``
with a ``like`` that uses lists reads an imported step unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

SEPARATOR = "."


def join(parts: Sequence[Any]) -> str:
    """``("params", "layers", 0, "kernel")`` -> ``"params.layers.0.kernel"``."""
    return SEPARATOR.join(str(part) for part in parts)


def check_unique(names: Iterable[tuple[str, str]]) -> None:
    """Raises ValueError when two leaves get the same name.

    Args:
      names: (name, description of the leaf) pairs, e.g. the jckpt key path.

    Raises:
      ValueError: names the two leaves, e.g. ``{"a.b": x}`` and ``{"a": {"b": y}}``; or a
        leaf has no name (the whole tree is one array).
    """
    seen: dict[str, str] = {}
    for name, where in names:
        if not name:
            raise ValueError("the checkpoint's tree is a single array with no key path, so it has no name")
        if name in seen:
            raise ValueError(
                f"leaves {seen[name]!r} and {where!r} both export as {name!r}: key names "
                f"containing {SEPARATOR!r} collide with nested keys"
            )
        seen[name] = where


def select(names: Sequence[str], patterns: str | Sequence[str] | None) -> list[str]:
    """The names matching any fnmatch pattern (case-sensitive), in their original order.

    Args:
      names: every tensor name.
      patterns: one pattern such as ``"params.*"``, several, or None for all names.

    Returns:
      The selected names.

    Raises:
      ValueError: no name matches.
    """
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        sample = ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"select={list(patterns)!r} matches none of the {len(names)} leaves ({sample})")
    return chosen


def nest(items: Iterable[tuple[Sequence[str], Any]], sequences: Iterable[Sequence[str]] = ()) -> dict:
    """Nested dicts from ``[(parts, value)]``; every key is a string.

    Args:
      items: the leaves, each under its key-path parts.
      sequences: key-path prefixes (tuples of parts) of nodes that were sequences in
        the source; such a node becomes a list when its keys are exactly 0..n-1.

    Returns:
      The nested tree (a dict at the top).

    Raises:
      ValueError: a name is both a leaf and the parent of other leaves
        (``a`` and ``a.b``), or two leaves share a name.
    """
    root: dict = {}
    for parts, value in items:
        parts = [str(p) for p in parts]
        if not parts:
            raise ValueError("a leaf without a name")
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{join(parts[: depth + 1])!r} is a leaf and also holds {join(parts)!r}")
            node = child
        if parts[-1] in node:
            kind = "holds other leaves" if isinstance(node[parts[-1]], dict) else "appears twice"
            raise ValueError(f"{join(parts)!r} {kind}")
        node[parts[-1]] = value
    return _listify(root, (), {tuple(str(p) for p in s) for s in sequences})


def _listify(node: Any, prefix: tuple[str, ...], sequences: set[tuple[str, ...]]) -> Any:
    if not isinstance(node, dict):
        return node
    children = {k: _listify(v, (*prefix, k), sequences) for k, v in node.items()}
    if prefix in sequences and sorted(children) == sorted(str(i) for i in range(len(children))):
        return [children[str(i)] for i in range(len(children))]
    return children
