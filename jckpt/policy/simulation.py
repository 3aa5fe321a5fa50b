"""The simulator: a policy run over events without saving anything.

:func:`simulate` is the manager's loop made pure -- decide, record the save as
the manager records it (``persistence.save_metadata``), update the state, apply
retention -- so a policy can be tried, tested and resumed (``history=``)
without touching a disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from jckpt.policy.base import Event, Policy, PolicyState, Saved, _step_of, decide, retain
from jckpt.policy.persistence import resume, save_metadata

__all__ = ["Simulation", "simulate"]


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
