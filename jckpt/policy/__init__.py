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

Which file owns what:

* ``base.py`` -- the algebra: ``Event``, ``Saved``, ``Policy``, ``Decision``,
  ``combine``, and ``decide`` / ``retain``;
* ``save_rules.py`` -- save rules and the kind rule, each with its state;
* ``keep_rules.py`` -- retention rules;
* ``persistence.py`` -- the manager's metadata entry (``META_KEY``,
  ``save_metadata``, ``saved_at``, ``save_cost``), the state codec and ``resume``;
* ``simulation.py`` -- ``simulate``: the manager's loop without the saving;
* ``_metrics.py`` -- reading and ranking a metric (private).

Example::

    from jckpt import policy as P

    pol = P.combine(P.every_n_steps(2), P.keep_last(2), P.keep_every_n_steps(4))
    run = P.simulate(pol, [P.Event(step=s, now=0.0) for s in range(12)])
    assert run.saved == [0, 2, 4, 6, 8, 10] and run.kept == [0, 4, 8, 10]
"""
# ruff: noqa: I001  (the public names: one per line)

from jckpt.policy.base import CombinedState
from jckpt.policy.base import Decision
from jckpt.policy.base import EmptyState
from jckpt.policy.base import Event
from jckpt.policy.base import Policy
from jckpt.policy.base import Saved
from jckpt.policy.base import combine
from jckpt.policy.base import decide
from jckpt.policy.base import retain
from jckpt.policy.keep_rules import keep_best
from jckpt.policy.keep_rules import keep_every_n_seconds
from jckpt.policy.keep_rules import keep_every_n_steps
from jckpt.policy.keep_rules import keep_last
from jckpt.policy.persistence import META_KEY
from jckpt.policy.persistence import decode_state
from jckpt.policy.persistence import encode_state
from jckpt.policy.persistence import resume
from jckpt.policy.persistence import save_cost
from jckpt.policy.persistence import save_metadata
from jckpt.policy.persistence import saved_at
from jckpt.policy.save_rules import BestOnlyState
from jckpt.policy.save_rules import EveryNSecondsState
from jckpt.policy.save_rules import IncrementalState
from jckpt.policy.save_rules import YoungDalyState
from jckpt.policy.save_rules import best_only
from jckpt.policy.save_rules import every_n_seconds
from jckpt.policy.save_rules import every_n_steps
from jckpt.policy.save_rules import incremental
from jckpt.policy.save_rules import on_preemption
from jckpt.policy.save_rules import on_steps
from jckpt.policy.save_rules import young_daly
from jckpt.policy.save_rules import young_daly_interval
from jckpt.policy.simulation import Simulation
from jckpt.policy.simulation import simulate

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
