"""Pytrees <-> flat lists of (key path, leaf).

A key path is a stable string such as ``"params/dense/kernel"``: dict keys,
attribute names (NamedTuples, dataclasses) and sequence indices joined by
``/``.  ``%`` and ``/`` inside a name are percent-escaped, so every path is
unambiguous.  The parts are also kept in a JSON-friendly form (``keys``) so
a tree can be rebuilt as nested dicts and lists without the original classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

# A key-path part as stored in a manifest: ("d", dict key) | ("a", attribute) | ("i", index).
KeyPart = tuple[str, Any]


def _is_none(x: Any) -> bool:
    return x is None


def _part(entry: Any) -> KeyPart:
    if isinstance(entry, jax.tree_util.DictKey):
        return ("d", entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return ("a", entry.name)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return ("i", entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return ("i", entry.key)
    raise TypeError(f"unsupported pytree key entry {entry!r}")


def _escape(name: Any) -> str:
    return str(name).replace("%", "%25").replace("/", "%2F")


def path_string(parts: Sequence[KeyPart]) -> str:
    """``[("d", "params"), ("a", "kernel")]`` -> ``"params/kernel"``."""
    return "/".join(_escape(value) for _, value in parts)


def flatten(tree: Any) -> tuple[list[tuple[str, list[KeyPart], Any]], Any]:
    """Flattens ``tree`` into ``[(path, parts, leaf)]`` and its treedef.

    ``None`` is kept as a leaf, so it round-trips.

    Raises:
      ValueError: two leaves map to the same path string.
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    flat, seen = [], set()
    for key_path, leaf in with_path:
        parts = [_part(entry) for entry in key_path]
        path = path_string(parts)
        if path in seen:
            raise ValueError(f"two leaves share the key path {path!r}")
        seen.add(path)
        flat.append((path, parts, leaf))
    return flat, treedef


def nest(items: Sequence[tuple[Sequence[KeyPart], Any]]) -> Any:
    """Rebuilds nested dicts/lists from ``[(parts, value)]``.

    Dict keys and attribute names become dict keys; sequence indices become
    list positions (a top-level list or tuple comes back as a list).  A tree with a
    single root leaf (no parts) returns it.  Iterative throughout, so trees of any
    depth rebuild (no RecursionError).
    """
    first = next((parts for parts, _ in items if parts), None)
    root = _ListNode() if first is not None and first[0][0] == "i" else _DictNode()
    for parts, value in items:
        if not parts:
            return value
        node = root
        for (_, key), (next_kind, _) in zip(parts[:-1], parts[1:]):
            child = node.get(key)
            if type(child) not in (_DictNode, _ListNode):
                child = node[key] = _ListNode() if next_kind == "i" else _DictNode()
            node = child
        node[parts[-1][1]] = value
    return _materialize(root)


class _DictNode(dict):
    """A dict node while nesting (told apart from leaf values that happen to be dicts)."""


class _ListNode(dict):
    """A dict of index -> child while nesting; becomes a list at the end."""


def _materialize(root: Any) -> Any:
    """Turns the nodes built by :func:`nest` into plain dicts and lists, children first, without recursion."""
    nodes = (_DictNode, _ListNode)
    if type(root) not in nodes:
        return root
    built: dict[int, Any] = {}  # id(node) -> its plain dict / list

    def plain(value: Any) -> Any:
        return built.pop(id(value)) if type(value) in nodes else value

    stack: list[tuple[dict, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            if type(node) is _ListNode:
                built[id(node)] = [plain(node[i]) for i in sorted(node)]
            else:
                built[id(node)] = {key: plain(value) for key, value in node.items()}
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in node.values() if type(child) in nodes)
    return built.pop(id(root))
