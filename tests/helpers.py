"""Shared test helpers: exact tree comparison."""

import jax
import numpy as np


def host(x):
    """A leaf as numpy (typed PRNG keys as their key data)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def assert_trees_equal(actual, expected):
    """Same tree structure, same dtypes, bit-identical values."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert type(a) is type(e) or (isinstance(a, jax.Array) and isinstance(e, jax.Array)), (
            type(a),
            type(e),
        )
        a, e = host(a), host(e)
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        assert a.shape == e.shape
        assert a.tobytes() == e.tobytes()  # bit-exact, NaNs included
