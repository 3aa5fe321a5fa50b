"""Retention rules: which of the saved checkpoints to keep.

Each constructor returns a :class:`~jckpt.policy.base.Policy` whose only
opinion is ``keep(state, history)`` (and, for :func:`keep_best`, ``best``).
Combined rules keep the union of their sets; the manager deletes the rest
after each commit, never the newest checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jckpt.policy._metrics import _best_of, _metric, _ranked
from jckpt.policy.base import (
    EmptyState,
    Policy,
    _abstain,
    _check_mode,
    _empty_init,
    _positive,
    _same_state,
    _step_of,
)
from jckpt.policy.persistence import saved_at

__all__ = [
    "keep_best",
    "keep_every_n_seconds",
    "keep_every_n_steps",
    "keep_last",
]


def keep_last(n: int) -> Policy:
    """Keep the ``n`` most recent checkpoints.

    Args:
      n: how many to keep, >= 1.

    Returns:
      A retention rule.

    Raises:
      ValueError: if ``n < 1``.

    Example::

        pol = combine(every_n_steps(1), keep_last(2))
        simulate(pol, [Event(s, 0.0) for s in range(5)]).kept  # [3, 4]
    """
    if int(n) != n or n < 1:
        raise ValueError(f"keep_last: n must be an integer >= 1, got {n!r}")

    def keep_fn(state: EmptyState, history: Sequence[Any]) -> frozenset[int]:
        del state
        return frozenset(sorted(_step_of(r) for r in history)[-n:])

    return Policy(_empty_init, _same_state, _abstain, _abstain, keep_fn, _abstain)


def keep_every_n_steps(n: int) -> Policy:
    """Keep every checkpoint whose step is a multiple of ``n``.

    Args:
      n: the step period, >= 1.

    Returns:
      A retention rule.

    Raises:
      ValueError: if ``n < 1``.

    Example::

        pol = combine(every_n_steps(2), keep_every_n_steps(4))
        simulate(pol, [Event(s, 0.0) for s in range(10)]).kept  # [0, 4, 8]
    """
    if int(n) != n or n < 1:
        raise ValueError(f"keep_every_n_steps: n must be an integer >= 1, got {n!r}")

    def keep_fn(state: EmptyState, history: Sequence[Any]) -> frozenset[int]:
        del state
        return frozenset(_step_of(r) for r in history if _step_of(r) % n == 0)

    return Policy(_empty_init, _same_state, _abstain, _abstain, keep_fn, _abstain)


def keep_best(metric: str, mode: str = "min", n: int = 1) -> Policy:
    """Keep the ``n`` checkpoints with the best ``metric``.

    A checkpoint saved without the metric cannot be judged and is always kept
    (combine with :func:`keep_last` or pass metrics at every save to bound
    them); a NaN metric ranks last. Ties go to the earlier step.

    Args:
      metric: the metric name, looked up in each checkpoint's metrics.
      mode: ``"min"`` (lower is better) or ``"max"``.
      n: how many to keep, >= 1.

    Returns:
      A retention rule that also names the best step (``best``).

    Raises:
      ValueError: for an unknown mode or ``n < 1``.

    Example::

        losses = [5, 1, 4, 3, 6, 2]
        events = [Event(s, 0.0, {"loss": v}) for s, v in enumerate(losses)]
        pol = combine(every_n_steps(1), keep_best("loss", "min", 2))
        simulate(pol, events).kept  # [1, 5]
    """
    _check_mode(mode)
    if int(n) != n or n < 1:
        raise ValueError(f"keep_best: n must be an integer >= 1, got {n!r}")

    def keep_fn(state: EmptyState, history: Sequence[Any]) -> frozenset[int]:
        del state
        unjudged = {_step_of(r) for r in history if _metric(r.metrics, metric) is None}
        return frozenset(_ranked(history, metric, mode)[:n]) | unjudged

    def best_fn(state: EmptyState, history: Sequence[Any]) -> int | None:
        del state
        return _best_of(history, metric, mode)

    return Policy(_empty_init, _same_state, _abstain, _abstain, keep_fn, best_fn)


def keep_every_n_seconds(seconds: float) -> Policy:
    """Keep checkpoints at least ``seconds`` apart (by save time), oldest first.

    The oldest checkpoint is kept, then the first one saved ``seconds`` or more
    after it, and so on. Deleting the others never changes which are kept.

    Args:
      seconds: the spacing, > 0.

    Returns:
      A retention rule.

    Raises:
      ValueError: if ``seconds <= 0``.

    Example::

        pol = combine(every_n_steps(1), keep_every_n_seconds(3600))
        simulate(pol, [Event(s, now=1500.0 * s) for s in range(6)]).kept  # [0, 3]
    """
    _positive("keep_every_n_seconds: seconds", seconds)

    def keep_fn(state: EmptyState, history: Sequence[Any]) -> frozenset[int]:
        del state
        kept, anchor = set(), None
        for r in sorted(history, key=_step_of):
            t = saved_at(r)
            if anchor is None or t - anchor >= seconds:
                kept.add(_step_of(r))
                anchor = t
        return frozenset(kept)

    return Policy(_empty_init, _same_state, _abstain, _abstain, keep_fn, _abstain)
