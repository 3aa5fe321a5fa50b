"""Train a small Flax NNX MLP on scikit-learn's digits, checkpointing with jckpt.

    python examples/train.py --config configs/digits.yaml
    python examples/train.py --config configs/digits.yaml --set train.steps=600  # resumes

The config (configs/digits.yaml) is read into the dataclasses below by
``configlib.py`` next to this file; its ``checkpoint:`` section is a
``jckpt.config.CheckpointConfig``.  Every run resumes from the latest
checkpoint in ``checkpoint.directory`` (and prints "resumed from step N").
The saved state is the model parameters (``nnx.split``), the optax state, the
RNG key that draws the batches and the step, so a resumed run ends with
exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jckpt
from jckpt import CheckpointManager, config

import configlib  # examples/configlib.py: YAML + --set overrides -> dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The MLP: the width of its hidden layer."""

    hidden: int = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation.

    Attributes:
      steps: train until this many updates are done (a resumed run continues to it).
      batch_size: examples per update, drawn with the saved RNG key.
      learning_rate: Adam's learning rate (constant, so runs can be extended).
      seed: seeds the initialisation, the batch RNG and the train/validation split.
      val_fraction: share of the data held out for validation.
      log_every: print the metrics every this many steps.
    """

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0
    val_fraction: float = 0.2
    log_every: int = 100


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """configs/digits.yaml."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: config.CheckpointConfig = config.CheckpointConfig()


class MLP(nnx.Module):
    """One ReLU hidden layer, then a linear read-out to the 10 classes."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


Data = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes; no download).

    Read straight from the file that ``sklearn.datasets.load_digits`` reads,
    which skips a second of importing scikit-learn.
    """
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1]
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def load_data(cfg: TrainConfig) -> Data:
    """The digits as float32 pixels in [0, 1] and int labels, split train / validation."""
    x, y = _digits()
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    n_val = int(len(x) * cfg.val_fraction)
    return jnp.asarray(x[n_val:]), jnp.asarray(y[n_val:]), jnp.asarray(x[:n_val]), jnp.asarray(y[:n_val])


def model_and_init(cfg: ExperimentConfig, tx: optax.GradientTransformation):
    """The model's graph definition and a traceable function making the initial train state.

    The state is a pytree: ``params`` (the ``nnx.Param`` state of the model),
    ``opt_state`` (optax), ``rng`` (a typed key drawing the batches) and ``step``.
    """

    def make_model() -> MLP:
        return MLP(cfg.model.hidden, rngs=nnx.Rngs(cfg.train.seed))

    graphdef, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param)

    def init() -> dict[str, Any]:
        _, params = nnx.split(make_model(), nnx.Param)
        return {
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key(cfg.train.seed + 1),
            "step": jnp.zeros((), jnp.int32),
        }

    return graphdef, init


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, batch_size: int):
    """A jitted update on a random batch that also evaluates on the validation set."""

    def loss_and_accuracy(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (jnp.argmax(logits, -1) == y).mean()

    @jax.jit
    def train_step(params, opt_state, rng, data: Data):
        x_train, y_train, x_val, y_val = data
        rng, sample = jax.random.split(rng)
        idx = jax.random.randint(sample, (batch_size,), 0, len(x_train))
        (loss, _), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(
            params, x_train[idx], y_train[idx]
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        val_loss, val_accuracy = loss_and_accuracy(params, x_val, y_val)
        metrics = {"train_loss": loss, "val_loss": val_loss, "val_accuracy": val_accuracy}
        return params, opt_state, rng, metrics

    return train_step


def log(step: int, metrics: dict) -> None:
    print(
        f"step {step:5d}  train_loss {float(metrics['train_loss']):.4f}  "
        f"val_loss {float(metrics['val_loss']):.4f}  "
        f"val_accuracy {float(metrics['val_accuracy']):.4f}"
    )


def main(argv: list[str] | None = None) -> dict:
    """Trains (resuming from the latest checkpoint if there is one); returns the final state."""
    cfg = configlib.parse_args(ExperimentConfig, argv, description=__doc__.splitlines()[0])
    ckpt, train = cfg.checkpoint, cfg.train
    tx = optax.adam(train.learning_rate)
    graphdef, init = model_and_init(cfg, tx)
    data = load_data(train)
    train_step = make_train_step(graphdef, tx, train.batch_size)

    with CheckpointManager(
        ckpt.directory,
        policy=ckpt.policy(),  # save / kind / retention rules from the YAML
        async_save=ckpt.async_save,
        handle_preemption=ckpt.handle_preemption,
        options=ckpt.save_options(),
    ) as mngr:
        # jit: one compiled program instead of many small eager ones.
        state, restored = mngr.restore_or_init(jax.jit(init))
        if restored is None:
            print(f"no checkpoint in {ckpt.directory}: starting from scratch")
        else:
            print(f"resumed from step {restored}")

        started = time.perf_counter()
        params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
        step = start = int(state["step"])
        metrics: dict = {}
        saved = False
        while step < train.steps and not mngr.should_stop():
            params, opt_state, rng, metrics = train_step(params, opt_state, rng, data)
            step += 1
            state = {"params": params, "opt_state": opt_state, "rng": rng, "step": np.int32(step)}
            if step % train.log_every == 0 or step == train.steps:
                log(step, metrics)
            saved = mngr.maybe_save(step, state, metrics)  # blocks only for the device-to-host copy
        if mngr.should_stop():
            print(f"preempted: saved step {step}, stopping")
        elif step > start and not saved:
            mngr.save(step, state, metrics)  # always keep the final state
    print(
        f"done: step {step} in {time.perf_counter() - started:.2f} s; checkpoints "
        f"{jckpt.all_steps(ckpt.directory)} in {ckpt.directory} (best: {mngr.best_step()})"
    )
    return state


if __name__ == "__main__":
    main()
