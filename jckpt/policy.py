"""Checkpoint policies: when to save, which kind to save, what to keep.

Modelled on optax: a policy is a :class:`Policy` NamedTuple of pure functions,
its state is a NamedTuple defined right above its constructor, constructors are
verbs and :func:`combine` composes them. Nothing here reads a clock, touches a
file or keeps hidden state: the time is always passed in (``Event.now``).

A policy answers four questions, each through one function; a function that has
no opinion returns ``None`` ("abstains"):

* ``should_save(state, event) -> bool | None`` -- save rules
  (:func:`every_n_steps`, :func:`every_n_seconds`, :func:`on_steps`,
  :func:`on_preemption`, :func:`best_only`, :func:`young_daly`);
* ``kind(state, event) -> str | None`` -- kind rules (:func:`incremental`);
* ``keep(state, history) -> frozenset[int] | None`` -- retention rules
  (:func:`keep_last`, :func:`keep_every_n_steps`, :func:`keep_best`,
  :func:`keep_every_n_seconds`);
* ``best(state, history) -> int | None`` -- which step is the best one
  (:func:`keep_best`, :func:`best_only`).

State is updated once per save with ``update(state, record)``, where ``record``
describes the checkpoint just saved (any object with the fields of
:class:`Saved`, e.g. a ``jckpt.CheckpointInfo``), and ``init(history)`` rebuilds
the state by folding ``update`` over a history of committed checkpoints. Because
retention may delete checkpoints whose records the state depended on (the best
metric, the count since the last full save), the manager also stores the state
in every checkpoint's metadata (:func:`save_metadata`) and :func:`resume`
restores it exactly, so a resumed run makes the same decisions as an
uninterrupted one.

Example::

    from jckpt import policy as P

    pol = P.combine(P.every_n_steps(2), P.keep_last(2), P.keep_every_n_steps(4))
    run = P.simulate(pol, [P.Event(step=s, now=0.0) for s in range(12)])
    assert run.saved == [0, 2, 4, 6, 8, 10] and run.kept == [0, 4, 8, 10]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "META_KEY",
    "BestOnlyState",
    "CombinedState",
    "Decision",
    "EmptyState",
    "Event",
    "EveryNSecondsState",
    "IncrementalState",
    "Policy",
    "Saved",
    "Simulation",
    "YoungDalyState",
    "best_only",
    "best_step",
    "combine",
    "decide",
    "decode_state",
    "encode_state",
    "every_n_seconds",
    "every_n_steps",
    "incremental",
    "keep_best",
    "keep_every_n_seconds",
    "keep_every_n_steps",
    "keep_last",
    "on_preemption",
    "on_steps",
    "resume",
    "retain",
    "save_cost",
    "save_metadata",
    "saved_at",
    "simulate",
    "young_daly",
    "young_daly_interval",
]

#: Key of the metadata entry the manager writes into every checkpoint it saves:
#: ``{"time": float, "blocking_seconds": float, "async": bool, "shared_cpu": bool,
#: "policy_state": ...}``.
META_KEY = "jckpt"

PolicyState = Any


# --------------------------------------------------------------------------- types


class Event(NamedTuple):
    """One call of the train loop into the manager: the input of a save decision.

    Attributes:
      step: the training step.
      now: the current time in seconds, from the manager's injected clock.
      metrics: metrics of this step (e.g. ``{"loss": 0.3}``) or ``None``.
      preempted: True when a preemption was signalled since the last save.
    """

    step: int
    now: float
    metrics: Mapping[str, Any] | None = None
    preempted: bool = False


class Saved(NamedTuple):
    """What a policy reads of one saved checkpoint.

    ``jckpt.CheckpointInfo`` has these fields (and more), so a history of
    ``CheckpointInfo`` can be passed wherever a history of ``Saved`` is expected.

    Attributes:
      step: the step of the checkpoint.
      kind: ``"full"`` or ``"incremental"``, as written.
      metrics: the metrics saved with it, or ``None``.
      metadata: the metadata saved with it, or ``None``; see :data:`META_KEY`.
      created: unix time of the save (fallback when metadata has no time).
      save_seconds: wall time the save took.
    """

    step: int
    kind: str = "full"
    metrics: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] | None = None
    created: float = 0.0
    save_seconds: float = 0.0


class Decision(NamedTuple):
    """The outcome of :func:`decide`: whether to save and which kind."""

    save: bool
    kind: str


class Policy(NamedTuple):
    """A checkpoint policy: pure functions over an explicit state.

    Attributes:
      init: ``init(history) -> state``; folds ``update`` over a history of saved
        checkpoints (ascending steps). ``init(())`` is the fresh state.
      update: ``update(state, record) -> state`` after a save of ``record``.
      should_save: ``should_save(state, event) -> bool | None``.
      kind: ``kind(state, event) -> "full" | "incremental" | None``.
      keep: ``keep(state, history) -> frozenset[int] | None``; the steps of
        ``history`` to keep (the others may be deleted).
      best: ``best(state, history) -> int | None``; the best step in history.

    A function returns ``None`` when the policy has no rule of that role.
    """

    init: Callable[[Sequence[Any]], PolicyState]
    update: Callable[[PolicyState, Any], PolicyState]
    should_save: Callable[[PolicyState, Event], bool | None]
    kind: Callable[[PolicyState, Event], str | None]
    keep: Callable[[PolicyState, Sequence[Any]], frozenset[int] | None]
    best: Callable[[PolicyState, Sequence[Any]], int | None]


class EmptyState(NamedTuple):
    """The state of a policy that needs none."""


# ------------------------------------------------------------------------ helpers


def _abstain(*_: Any) -> None:
    return None


def _same_state(state: PolicyState, _record: Any) -> PolicyState:
    return state


def _empty_init(_history: Sequence[Any]) -> EmptyState:
    return EmptyState()


def _folding_init(
    empty: PolicyState, update: Callable[[PolicyState, Any], PolicyState]
) -> Callable[[Sequence[Any]], PolicyState]:
    def init_fn(history: Sequence[Any]) -> PolicyState:
        return functools.reduce(update, sorted(history, key=_step_of), empty)

    return init_fn


def _step_of(record: Any) -> int:
    return int(record.step)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f'mode must be "min" or "max", got {mode!r}')


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


def _manager_meta(record: Any) -> Mapping[str, Any]:
    meta = getattr(record, "metadata", None) or {}
    entry = meta.get(META_KEY) if isinstance(meta, Mapping) else None
    return entry if isinstance(entry, Mapping) else {}


def saved_at(record: Any) -> float:
    """The time of a save on the manager's clock.

    Args:
      record: a saved checkpoint (:class:`Saved` or ``jckpt.CheckpointInfo``).

    Returns:
      ``metadata["jckpt"]["time"]`` when the manager recorded it (the injected
      clock at the decision), else ``record.created``.

    Example::

        saved_at(Saved(step=3, created=10.0))  # 10.0
    """
    t = _manager_meta(record).get("time")
    return float(t) if t is not None else float(record.created)


def save_cost(record: Any) -> float:
    """Seconds of training a save cost (the Young-Daly ``C``).

    Args:
      record: a saved checkpoint (:class:`Saved` or ``jckpt.CheckpointInfo``).

    Returns:
      For an asynchronous save recorded by the manager while training runs on
      an accelerator, the blocking time (device-to-host snapshot plus any wait
      for the previous save): the write overlaps training. When the write runs
      on the CPU that also trains (``"shared_cpu"``, e.g. JAX on CPU) or the
      save was synchronous, that plus ``save_seconds``. Without manager
      metadata, ``save_seconds``.

    Example::

        save_cost(Saved(step=0, save_seconds=2.5))  # 2.5
    """
    meta = _manager_meta(record)
    if "blocking_seconds" not in meta:
        return float(record.save_seconds)
    blocking = float(meta["blocking_seconds"])
    if meta.get("async") and not meta.get("shared_cpu"):
        return blocking
    return blocking + float(record.save_seconds)


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


# ----------------------------------------------------------------- retention rules


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


# ------------------------------------------------------------------------ combine


class CombinedState(NamedTuple):
    """The states of the combined policies, in order."""

    inner: tuple


def combine(*policies: Policy) -> Policy:
    """Compose policies: save if any save rule fires, keep the union.

    * save: True if any save rule says so; with no save rule, abstains (the
      manager then saves at every call, see :func:`decide`);
    * kind: ``"full"`` if any kind rule says so, else the kind rules' answer;
    * keep: the union of the retention rules' sets; with no retention rule,
      abstains (everything is kept, see :func:`retain`);
    * best: the first rule that names a best step.

    Args:
      *policies: the policies to combine.

    Returns:
      The combined policy.

    Example::

        pol = combine(every_n_steps(2), keep_last(2), keep_every_n_steps(4))
        simulate(pol, [Event(s, 0.0) for s in range(12)]).kept  # [0, 4, 8, 10]
    """
    for i, p in enumerate(policies):
        if not isinstance(p, Policy):
            raise TypeError(f"combine: argument {i} is a {type(p).__name__}, not a Policy")
    policies = tuple(policies)

    def init_fn(history: Sequence[Any]) -> CombinedState:
        return CombinedState(tuple(p.init(history) for p in policies))

    def update_fn(state: CombinedState, record: Any) -> CombinedState:
        return CombinedState(tuple(p.update(s, record) for p, s in zip(policies, state.inner, strict=True)))

    def answers(fn_name: str, state: CombinedState, arg: Any) -> list:
        out = (getattr(p, fn_name)(s, arg) for p, s in zip(policies, state.inner, strict=True))
        return [a for a in out if a is not None]

    def should_save_fn(state: CombinedState, event: Event) -> bool | None:
        votes = answers("should_save", state, event)
        return any(votes) if votes else None

    def kind_fn(state: CombinedState, event: Event) -> str | None:
        kinds = answers("kind", state, event)
        if not kinds:
            return None
        return "full" if "full" in kinds else kinds[0]

    def keep_fn(state: CombinedState, history: Sequence[Any]) -> frozenset[int] | None:
        sets = answers("keep", state, history)
        return frozenset().union(*sets) if sets else None

    def best_fn(state: CombinedState, history: Sequence[Any]) -> int | None:
        bests = answers("best", state, history)
        return bests[0] if bests else None

    return Policy(init_fn, update_fn, should_save_fn, kind_fn, keep_fn, best_fn)


# -------------------------------------------------------------- driving a policy


def decide(policy: Policy, state: PolicyState, event: Event) -> Decision:
    """Whether to save at ``event`` and which kind.

    Args:
      policy: the policy.
      state: its current state.
      event: the step, time and metrics.

    Returns:
      ``Decision(save, kind)``; a policy without a save rule saves at every
      event, one without a kind rule saves ``"full"``.

    Example::

        decide(every_n_steps(2), EmptyState(), Event(4, 0.0))  # Decision(True, 'full')
    """
    save = policy.should_save(state, event)
    kind = policy.kind(state, event)
    return Decision(True if save is None else bool(save), kind or "full")


def retain(policy: Policy, state: PolicyState, history: Sequence[Any]) -> frozenset[int]:
    """The steps of ``history`` the policy keeps (all of them without a retention rule).

    Args:
      policy: the policy.
      state: its current state.
      history: the committed checkpoints.

    Returns:
      A subset of the steps in ``history``.

    Example::

        retain(keep_last(1), EmptyState(), [Saved(1), Saved(2)])  # frozenset({2})
    """
    steps = frozenset(_step_of(r) for r in history)
    keep = policy.keep(state, history)
    return steps if keep is None else steps & frozenset(keep)


def best_step(policy: Policy, state: PolicyState, history: Sequence[Any]) -> int | None:
    """The best step of ``history`` by the policy's metric (``None`` if it has none).

    Example::

        best_step(keep_best("loss"), EmptyState(), [Saved(1, metrics={"loss": 2.0})])  # 1
    """
    return policy.best(state, history)


def encode_state(state: PolicyState) -> Any:
    """A JSON-serialisable form of a policy state (NamedTuples keep their type name).

    Args:
      state: a state made of NamedTuples, tuples and scalars.

    Returns:
      Nested dicts/lists/scalars.

    Raises:
      TypeError: for a value that is not a NamedTuple, tuple, or scalar.

    Example::

        encode_state(EveryNSecondsState(5.0))  # {'type': 'EveryNSecondsState', 'fields': [5.0]}
    """
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return {"type": type(state).__name__, "fields": [encode_state(v) for v in state]}
    if isinstance(state, tuple):
        return [encode_state(v) for v in state]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot encode policy state value of type {type(state).__name__}")


def decode_state(template: PolicyState, data: Any) -> PolicyState:
    """Rebuild a state from :func:`encode_state` output, shaped like ``template``.

    Args:
      template: a state of the same policy (e.g. ``policy.init(())``).
      data: the encoded state.

    Returns:
      The state, with the template's NamedTuple types.

    Raises:
      ValueError: if ``data`` was not encoded from a state of this structure
        (e.g. the policy changed between runs).

    Example::

        pol = every_n_seconds(60)
        decode_state(pol.init(()), encode_state(EveryNSecondsState(5.0)))
    """
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        name = type(template).__name__
        if (
            not isinstance(data, Mapping)
            or data.get("type") != name
            or not isinstance(data.get("fields"), list)
            or len(data["fields"]) != len(template)
        ):
            raise ValueError(f"stored policy state does not match {name}: {data!r}")
        return type(template)(*(decode_state(t, d) for t, d in zip(template, data["fields"], strict=True)))
    if isinstance(template, tuple):
        if not isinstance(data, list) or len(data) != len(template):
            raise ValueError(f"stored policy state does not match a {len(template)}-tuple")
        return tuple(decode_state(t, d) for t, d in zip(template, data, strict=True))
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    raise ValueError(f"stored policy state has a {type(data).__name__} where a scalar belongs")


def save_metadata(
    state: PolicyState,
    event: Event,
    *,
    blocking_seconds: float = 0.0,
    async_save: bool = False,
    shared_cpu: bool = False,
) -> dict[str, Any]:
    """The metadata entry to store with a save, so :func:`resume` can restart exactly.

    Args:
      state: the policy state *before* this save's ``update``.
      event: the event that saved.
      blocking_seconds: how long the save blocked the loop before it was handed
        off (snapshot plus waiting for the previous save).
      async_save: whether the rest of the save ran in the background.
      shared_cpu: whether that background work competes with training for the
        same CPU (training on the CPU backend); see :func:`save_cost`.

    Returns:
      ``{META_KEY: {...}}``, to merge into the checkpoint's metadata.

    Example::

        save_metadata(EmptyState(), Event(3, now=7.0))["jckpt"]["time"]  # 7.0
    """
    return {
        META_KEY: {
            "time": float(event.now),
            "blocking_seconds": float(blocking_seconds),
            "async": bool(async_save),
            "shared_cpu": bool(shared_cpu),
            "policy_state": encode_state(state),
        }
    }


def resume(policy: Policy, history: Sequence[Any]) -> PolicyState:
    """The state of a run whose last save is the newest checkpoint in ``history``.

    Uses the state stored with the newest checkpoint (see :func:`save_metadata`)
    and folds that checkpoint in; this is exact even when retention deleted
    checkpoints the state depended on. Falls back to ``policy.init(history)``
    when the newest checkpoint holds no state of this policy's structure
    (saved without the manager, or the policy changed).

    Args:
      policy: the policy.
      history: the committed checkpoints, any order.

    Returns:
      The policy state.

    Example::

        pol = every_n_seconds(60)
        resume(pol, [Saved(0, created=5.0)])  # EveryNSecondsState(last_time=5.0)
    """
    if not history:
        return policy.init(())
    newest = max(history, key=_step_of)
    stored = _manager_meta(newest).get("policy_state")
    if stored is not None:
        try:
            return policy.update(decode_state(policy.init(()), stored), newest)
        except ValueError:
            pass
    return policy.init(history)


class Simulation(NamedTuple):
    """The outcome of :func:`simulate`.

    Attributes:
      saved: steps saved, in order.
      kinds: the kind of each save.
      kept: the steps that survive retention at the end, ascending.
      history: the surviving checkpoint records (to resume a simulation from).
      state: the final policy state.
    """

    saved: list[int]
    kinds: list[str]
    kept: list[int]
    history: list[Saved]
    state: PolicyState


def simulate(
    policy: Policy,
    events: Iterable[Event],
    *,
    history: Sequence[Any] = (),
    save_seconds: float = 0.0,
) -> Simulation:
    """Run a policy over events without saving anything: the manager's loop, pure.

    Each save is recorded like the manager records it (synchronous, costing
    ``save_seconds``), retention runs after each save, and ``history`` lets a
    simulation resume where another stopped (via :func:`resume`).

    Args:
      policy: the policy.
      events: the events, in order.
      history: checkpoints that exist before the first event.
      save_seconds: the duration recorded for each simulated save.

    Returns:
      A :class:`Simulation`.

    Example::

        first = simulate(every_n_steps(2), [Event(s, 0.0) for s in range(3)])
        simulate(every_n_steps(2), [Event(s, 0.0) for s in range(3, 6)],
                 history=first.history).saved  # [4]
    """
    records = sorted(history, key=_step_of)
    state = resume(policy, records)
    saved, kinds = [], []
    existing = {_step_of(r) for r in records}
    for event in events:
        if event.step in existing:
            continue
        decision = decide(policy, state, event)
        if not decision.save:
            continue
        record = Saved(
            step=int(event.step),
            kind=decision.kind,
            metrics=dict(event.metrics) if event.metrics else None,
            metadata=save_metadata(state, event),
            created=float(event.now),
            save_seconds=float(save_seconds),
        )
        state = policy.update(state, record)
        records.append(record)
        existing.add(record.step)
        saved.append(record.step)
        kinds.append(record.kind)
        keep = retain(policy, state, records)
        records = [r for r in records if _step_of(r) in keep]
    return Simulation(saved, kinds, sorted(_step_of(r) for r in records), records, state)
