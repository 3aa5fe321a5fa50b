"""A Flax NNX train loop over a Grain pipeline with a numpy Generator, checkpointed by a CheckpointManager
(spawned and killed by tests/test_host_state_processes.py; the loop of docs/quickstart.md).

Usage: ``python tests/host_state_trainer.py ROOT LOG STEPS``.  Resumes from ROOT when it holds a
checkpoint; appends ``[step, batch]`` to LOG for every step it trains and prints ``step N``; at the end
writes the final parameters to LOG.final.npy.
"""

import json
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jckpt
from jckpt import policy as P

root, log_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])

X = np.random.default_rng(0).normal(size=(96, 4)).astype(np.float32)
W = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))[:, 0]


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


model = Model(nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
data = iter(grain.MapDataset.range(len(X)).shuffle(seed=42).repeat().batch(8))  # example indices
noise = np.random.default_rng(1)  # host-side randomness: label noise


def train_state():
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer), "data": data, "noise": noise}


with jckpt.CheckpointManager(root, policy=P.every_n_steps(3)) as mngr:
    restored, last = mngr.restore_or_init(train_state)  # sets data and noise in place
    if last is not None:
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
    with open(log_path, "a") as log:
        for step in range(1 if last is None else last + 1, steps + 1):
            batch = next(data)
            y = X[batch] @ W + 0.1 * noise.normal(size=len(batch)).astype(np.float32)
            train_step(model, optimizer, X[batch], y)
            log.write(json.dumps([step, batch.tolist()]) + "\n")
            log.flush()
            print("step", step, flush=True)
            mngr.maybe_save(step, train_state())
params = jax.tree.leaves(nnx.state(model))
np.save(f"{log_path}.final.npy", np.concatenate([np.asarray(x).ravel() for x in params]))
