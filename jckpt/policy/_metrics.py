"""Reading a named metric of an event or a checkpoint, and ranking checkpoints by it.

Shared by the rules that judge checkpoints by a metric: ``best_only`` (a save
rule) and ``keep_best`` (a retention rule). Missing or non-numeric metrics read
as ``None``; NaN is never better and ranks last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jckpt.policy.base import _step_of


def _metric(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    """The metric ``name`` as a float, or ``None`` when absent or not a number."""
    if not metrics or name not in metrics or metrics[name] is None:
        return None
    try:
        return float(metrics[name])
    except (TypeError, ValueError):
        return None


def _better(value: float, than: float | None, mode: str) -> bool:
    """Strictly better; NaN is never better, anything finite beats ``None``."""
    if math.isnan(value):
        return False
    if than is None:
        return True
    return value < than if mode == "min" else value > than


def _best_of(history: Sequence[Any], metric: str, mode: str) -> int | None:
    ranked = _ranked(history, metric, mode)
    return ranked[0] if ranked else None


def _ranked(history: Sequence[Any], metric: str, mode: str) -> list[int]:
    """Steps that have the metric, best first; NaN last; ties: earlier step first."""
    scored = []
    for r in history:
        value = _metric(r.metrics, metric)
        if value is not None:
            key = math.inf if math.isnan(value) else (value if mode == "min" else -value)
            scored.append((key, _step_of(r)))
    return [step for _, step in sorted(scored)]
