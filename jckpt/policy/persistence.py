"""What the manager stores with each save so that a restarted run decides like an uninterrupted one.

Retention may delete the checkpoints a policy state depended on (the best
metric so far, the count since the last full save), so the manager writes the
state *before* each save into that checkpoint's metadata, under
:data:`META_KEY`, together with the time of the decision on its clock and what
the save cost (:func:`save_metadata`). This file owns that entry:

* writing it: :func:`save_metadata`, with the state codec
  :func:`encode_state` / :func:`decode_state` (JSON-safe, NamedTuple types
  checked on the way back);
* reading it: :func:`saved_at` (the save's time) and :func:`save_cost` (the
  Young-Daly ``C``), which the time-based rules use;
* restarting from it: :func:`resume`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jckpt.policy.base import Event, Policy, PolicyState, _step_of

__all__ = [
    "META_KEY",
    "decode_state",
    "encode_state",
    "resume",
    "save_cost",
    "save_metadata",
    "saved_at",
]

#: Key of the metadata entry the manager writes into every checkpoint it saves:
#: ``{"time": float, "blocking_seconds": float, "async": bool, "shared_cpu": bool,
#: "policy_state": ...}``.
META_KEY = "jckpt"


# ------------------------------------------------------------- reading the entry


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


# -------------------------------------------------------------- the state codec


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


# ------------------------------------------------------------- writing, resuming


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
