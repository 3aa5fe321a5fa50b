"""The policy algebra: what a policy is, how policies compose, how one is asked.

This file owns the types every rule speaks -- :class:`Event` (the input of a
decision), :class:`Saved` (what a rule reads of a saved checkpoint),
:class:`Policy` (the NamedTuple of pure functions), :class:`Decision` -- and
the operations on policies: :func:`combine` composes them; :func:`decide`,
:func:`retain` and ``Policy.best`` are how the manager (and
``jckpt.policy.simulate``) ask one. It also holds the small helpers the rule
constructors share (abstaining, a stateless init, an init that folds
``update`` over a history, argument checks).

The rules themselves live in ``save_rules.py`` and ``keep_rules.py``; what the
manager stores to resume a policy, in ``persistence.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "CombinedState",
    "Decision",
    "EmptyState",
    "Event",
    "Policy",
    "PolicyState",
    "Saved",
    "combine",
    "decide",
    "retain",
]

#: A policy's state: NamedTuples, tuples and scalars (see ``persistence.encode_state``).
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
      metadata: the metadata saved with it, or ``None``; see ``persistence.META_KEY``.
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


# ---------------------------------------------------------- helpers for the rules


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
