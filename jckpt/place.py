"""Placing: host buffers become the values asked for (jax arrays on their shardings, numpy, scalars, keys),
and saved host states are set into their objects."""

from __future__ import annotations

import random
from typing import Any

import jax
import numpy as np

from jckpt import chunking
from jckpt.read import LeafPlan, StatePlan

BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")  # numpy's, by their state's name


def _placements(plan: LeafPlan) -> list[tuple[np.ndarray, Any]]:
    """(host data, device or sharding) pairs that make up a jax target."""
    target = plan.target

    def host(region):
        data = plan.host(region)
        return data if target.dtype is None or target.dtype == data.dtype else data.astype(target.dtype)

    if target.sharding is None:
        return [(host(tuple(slice(0, n) for n in plan.shape)), None)]
    index_map = target.sharding.addressable_devices_indices_map(plan.shape)
    return [(host(chunking.normalize(index, plan.shape)), device) for device, index in index_map.items()]


def _finish_host(plan: LeafPlan) -> Any:
    """A non-jax target's value: Python scalar, numpy array or scalar, or PRNG key array."""
    target = plan.target
    whole = tuple(slice(0, n) for n in plan.shape)
    data = plan.host(whole)
    if target.dtype is not None and target.dtype != data.dtype:
        data = data.astype(target.dtype)
    if target.kind == "python":
        return target.py_type(data.item()) if target.py_type else data.item()
    if target.kind == "numpy":
        return data[()] if target.scalar else data
    impl = plan.leaf.extra["prng_impl"]
    if target.sharding is None:
        return jax.random.wrap_key_data(data, impl=impl)
    key_shape = jax.eval_shape(lambda: jax.random.wrap_key_data(data, impl=impl)).shape
    return jax.make_array_from_callback(  # works for shardings that span processes
        key_shape, target.sharding, lambda index: jax.random.wrap_key_data(data[index], impl=impl)
    )


def finish(plans: list[LeafPlan]) -> list[Any]:
    """Every plan's value; all jax placements go through one batched ``jax.device_put`` per kind."""
    values: list[Any] = [None] * len(plans)
    on_default, placed = [], []  # (plan index, host) / (plan index, [(host, device)])
    for i, plan in enumerate(plans):
        if plan.target.kind != "jax" or plan.target.key:
            values[i] = _finish_host(plan)
        elif plan.target.sharding is None:
            on_default.append((i, _placements(plan)[0][0]))
        else:
            placed.append((i, _placements(plan)))
    if on_default:
        for (i, _), array in zip(on_default, jax.device_put([h for _, h in on_default])):
            values[i] = array
    pairs = [pair for _, leaf_pairs in placed for pair in leaf_pairs]
    arrays = iter(jax.device_put([h for h, _ in pairs], [d for _, d in pairs]))
    for i, leaf_pairs in placed:
        shards = [next(arrays) for _ in leaf_pairs]
        plan = plans[i]
        values[i] = jax.make_array_from_single_device_arrays(plan.shape, plan.target.sharding, shards)
    return values


def _set(plan: StatePlan, state: Any) -> Any:
    """The target object with ``state`` set: the live one from ``like``, else a new generator
    (numpy, Python) or, for other objects, the state itself."""
    kind, live = plan.leaf.extra["host_type"], plan.target.live
    if kind == "numpy.random.Generator" and live is None:
        name = state.get("bit_generator") if isinstance(state, dict) else None
        if name not in BIT_GENERATORS:
            raise ValueError(f"leaf {plan.leaf.path!r}: unknown numpy bit generator {name!r}")
        live = np.random.Generator(getattr(np.random, name)())
    elif kind == "random.Random" and live is None:
        live = random.Random()
    elif live is None:
        return state
    try:
        if kind == "numpy.random.Generator":
            live.bit_generator.state = state
        elif kind == "random.Random":
            version, internal, gauss = state
            live.setstate((version, tuple(internal), gauss))
        else:
            live.set_state(state)
    except Exception as e:
        raise ValueError(
            f"leaf {plan.leaf.path!r}: setting the saved state into the {type(live).__name__} failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    return live


def set_states(plans: list[StatePlan], states: list[Any]) -> list[Any]:
    """Each host-state plan's value, with ``states[i]`` (this process's state) set into its target."""
    return [_set(plan, state) for plan, state in zip(plans, states)]
