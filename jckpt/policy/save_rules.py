"""Save rules (when to save) and the kind rule (full or incremental).

Each constructor is a verb returning a :class:`~jckpt.policy.base.Policy`
whose only opinions are ``should_save`` (or, for :func:`incremental`,
``kind``); its state, if it needs one, is the NamedTuple defined right above
it. Time comes from ``Event.now`` and from the recorded save times
(``persistence.saved_at``), never from a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from jckpt.policy._metrics import _best_of, _better, _metric
from jckpt.policy.base import (
    EmptyState,
    Event,
    Policy,
    _abstain,
    _check_mode,
    _empty_init,
    _folding_init,
    _positive,
    _same_state,
)
from jckpt.policy.persistence import save_cost, saved_at

__all__ = [
    "BestOnlyState",
    "EveryNSecondsState",
    "IncrementalState",
    "YoungDalyState",
    "best_only",
    "every_n_seconds",
    "every_n_steps",
    "incremental",
    "on_preemption",
    "on_steps",
    "young_daly",
    "young_daly_interval",
]


# --------------------------------------------------------------------- save rules


def every_n_steps(n: int) -> Policy:
    """Save at every step that is a multiple of ``n`` (0, n, 2n, ...).

    The rule is a pure function of the step, so it needs no state and a resumed
    run saves at exactly the same steps.

    Args:
      n: the interval in steps, >= 1.

    Returns:
      A save rule.

    Raises:
      ValueError: if ``n < 1``.

    Example::

        simulate(every_n_steps(2), [Event(s, 0.0) for s in range(6)]).saved  # [0, 2, 4]
    """
    if int(n) != n or n < 1:
        raise ValueError(f"every_n_steps: n must be an integer >= 1, got {n!r}")

    def should_save_fn(state: EmptyState, event: Event) -> bool:
        del state
        return event.step % n == 0

    return Policy(_empty_init, _same_state, should_save_fn, _abstain, _abstain, _abstain)


class EveryNSecondsState(NamedTuple):
    """Time of the last save (any rule's), or ``None`` before the first."""

    last_time: float | None


def every_n_seconds(seconds: float) -> Policy:
    """Save when at least ``seconds`` have passed since the last save.

    The first call saves. The interval is measured from the last save of any
    rule (a forced or preemption save restarts it), on the injected clock.

    Args:
      seconds: the minimum time between saves, > 0.

    Returns:
      A save rule.

    Raises:
      ValueError: if ``seconds <= 0``.

    Example::

        events = [Event(s, now=1800.0 * s) for s in range(8)]
        simulate(every_n_seconds(3600), events).saved  # [0, 2, 4, 6]
    """
    _positive("every_n_seconds: seconds", seconds)

    def update_fn(state: EveryNSecondsState, record: Any) -> EveryNSecondsState:
        del state
        return EveryNSecondsState(saved_at(record))

    def should_save_fn(state: EveryNSecondsState, event: Event) -> bool:
        return state.last_time is None or event.now - state.last_time >= seconds

    init_fn = _folding_init(EveryNSecondsState(None), update_fn)
    return Policy(init_fn, update_fn, should_save_fn, _abstain, _abstain, _abstain)


def on_steps(steps: Iterable[int]) -> Policy:
    """Save at exactly the given steps.

    Args:
      steps: the steps to save at.

    Returns:
      A save rule.

    Example::

        simulate(on_steps([1, 4]), [Event(s, 0.0) for s in range(6)]).saved  # [1, 4]
    """
    wanted = frozenset(int(s) for s in steps)

    def should_save_fn(state: EmptyState, event: Event) -> bool:
        del state
        return event.step in wanted

    return Policy(_empty_init, _same_state, should_save_fn, _abstain, _abstain, _abstain)


def on_preemption() -> Policy:
    """Save when a preemption was signalled (``Event.preempted``).

    ``CheckpointManager`` saves on a preemption whatever its policy says; this
    rule is for driving policies by hand (or a loop of your own).

    Returns:
      A save rule.

    Example::

        events = [Event(0, 0.0), Event(1, 0.0, preempted=True)]
        simulate(on_preemption(), events).saved  # [1]
    """

    def should_save_fn(state: EmptyState, event: Event) -> bool:
        del state
        return bool(event.preempted)

    return Policy(_empty_init, _same_state, should_save_fn, _abstain, _abstain, _abstain)


class BestOnlyState(NamedTuple):
    """Best value of the metric among saved checkpoints, or ``None``."""

    best: float | None


def best_only(metric: str, mode: str = "min") -> Policy:
    """Save only when ``metric`` is strictly better than at every earlier save.

    An event without the metric (or with NaN) does not save.

    Args:
      metric: the metric name, looked up in ``Event.metrics``.
      mode: ``"min"`` (lower is better) or ``"max"``.

    Returns:
      A save rule that also names the best step (``best``).

    Raises:
      ValueError: for an unknown mode.

    Example::

        losses = [5, 1, 4, 0.5]
        events = [Event(s, 0.0, {"loss": v}) for s, v in enumerate(losses)]
        simulate(best_only("loss"), events).saved  # [0, 1, 3]
    """
    _check_mode(mode)

    def update_fn(state: BestOnlyState, record: Any) -> BestOnlyState:
        value = _metric(record.metrics, metric)
        if value is not None and _better(value, state.best, mode):
            return BestOnlyState(value)
        return state

    def should_save_fn(state: BestOnlyState, event: Event) -> bool:
        value = _metric(event.metrics, metric)
        return value is not None and _better(value, state.best, mode)

    def best_fn(state: BestOnlyState, history: Sequence[Any]) -> int | None:
        del state
        return _best_of(history, metric, mode)

    init_fn = _folding_init(BestOnlyState(None), update_fn)
    return Policy(init_fn, update_fn, should_save_fn, _abstain, _abstain, best_fn)


class YoungDalyState(NamedTuple):
    """Time of the last save and the smoothed measured save cost (seconds)."""

    last_time: float | None
    cost: float | None


def young_daly_interval(cost_seconds: float, mtbf_seconds: float) -> float:
    """The Young-Daly optimal checkpoint interval ``sqrt(2 * C * MTBF)``.

    With a checkpoint every ``T`` seconds that blocks training for ``C``
    seconds, and failures at rate ``1 / MTBF``, the expected fraction of time
    wasted is about ``C / T + T / (2 * MTBF)`` (saving, plus half an interval
    of lost work per failure); it is smallest at ``T = sqrt(2 * C * MTBF)``.

    Args:
      cost_seconds: the cost ``C`` of one save, >= 0.
      mtbf_seconds: the mean time between failures of the whole job, > 0.

    Returns:
      The interval in seconds.

    Example::

        young_daly_interval(2.0, 3600.0)  # 120.0
    """
    return math.sqrt(2.0 * max(cost_seconds, 0.0) * mtbf_seconds)


def young_daly(
    mtbf_seconds: float,
    *,
    cost_seconds: float | None = None,
    smoothing: float = 0.5,
    min_interval_seconds: float = 0.0,
) -> Policy:
    """Save every ``sqrt(2 * C * MTBF)`` seconds, with ``C`` measured.

    ``C`` is the training time a save costs (:func:`save_cost`): for an
    asynchronous save while training runs on an accelerator, only the
    device-to-host snapshot plus any wait for the previous save; for a
    synchronous save, or when the background write shares the CPU with
    training, the whole save. It is an exponential moving average over the
    saves so far; the first call saves, to measure it. If saves come faster
    than they can be written, the wait for the previous one enters ``C`` and
    the interval grows by itself.

    Args:
      mtbf_seconds: the mean time between failures of the whole job (for N
        nodes failing independently, the per-node MTBF divided by N).
      cost_seconds: a fixed ``C`` instead of the measured one.
      smoothing: weight of the newest measurement in the moving average, (0, 1].
      min_interval_seconds: a floor for the interval.

    Returns:
      A save rule.

    Raises:
      ValueError: for a non-positive MTBF or a smoothing outside (0, 1].

    Example::

        # A save costs 2 s and the job fails once an hour: save every 120 s.
        events = [Event(s, now=60.0 * s) for s in range(7)]
        saves = [Saved(step=0, save_seconds=2.0)]
        simulate(young_daly(3600.0), events[1:], history=saves, save_seconds=2.0).saved
        # [2, 4, 6]
    """
    _positive("young_daly: mtbf_seconds", mtbf_seconds)
    if not 0.0 < smoothing <= 1.0:
        raise ValueError(f"young_daly: smoothing must be in (0, 1], got {smoothing!r}")

    def update_fn(state: YoungDalyState, record: Any) -> YoungDalyState:
        cost = save_cost(record)
        if state.cost is not None:
            cost = (1.0 - smoothing) * state.cost + smoothing * cost
        return YoungDalyState(saved_at(record), cost)

    def should_save_fn(state: YoungDalyState, event: Event) -> bool:
        cost = cost_seconds if cost_seconds is not None else state.cost
        if state.last_time is None or cost is None:
            return True
        interval = max(young_daly_interval(cost, mtbf_seconds), min_interval_seconds)
        return event.now - state.last_time >= interval

    init_fn = _folding_init(YoungDalyState(None, None), update_fn)
    return Policy(init_fn, update_fn, should_save_fn, _abstain, _abstain, _abstain)


# ---------------------------------------------------------------------- kind rule


class IncrementalState(NamedTuple):
    """Saves since the last full one (0 right after it), ``None`` before any."""

    since_full: int | None


def incremental(full_every: int) -> Policy:
    """Make every ``full_every``-th save full and the others incremental.

    Counting restarts at each save recorded as full, so if the store writes a
    full checkpoint when asked for an incremental one, the next save asks
    for incremental again.

    Args:
      full_every: the period of full saves, >= 1 (1: always full).

    Returns:
      A kind rule.

    Raises:
      ValueError: if ``full_every < 1``.

    Example::

        pol = combine(every_n_steps(1), incremental(full_every=3))
        simulate(pol, [Event(s, 0.0) for s in range(5)]).kinds
        # ['full', 'incremental', 'incremental', 'full', 'incremental']
    """
    if int(full_every) != full_every or full_every < 1:
        raise ValueError(f"incremental: full_every must be an integer >= 1, got {full_every!r}")

    def update_fn(state: IncrementalState, record: Any) -> IncrementalState:
        if record.kind == "full":
            return IncrementalState(0)
        return IncrementalState((state.since_full or 0) + 1)

    def kind_fn(state: IncrementalState, event: Event) -> str:
        del event
        if state.since_full is None or state.since_full + 1 >= full_every:
            return "full"
        return "incremental"

    init_fn = _folding_init(IncrementalState(None), update_fn)
    return Policy(init_fn, update_fn, _abstain, kind_fn, _abstain, _abstain)
