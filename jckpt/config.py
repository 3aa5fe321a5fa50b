"""The ``checkpoint:`` section of a training config, and the policy and options it describes.

:class:`CheckpointConfig` (with :class:`KeepBestConfig`) is a frozen dataclass
whose defaults are the documented default (``configs/checkpoint.yaml``); it
checks its values when it is built, and :meth:`CheckpointConfig.policy` and
:meth:`CheckpointConfig.save_options` turn it into a ``jckpt.policy.Policy``
and a ``jckpt.SaveOptions``::

    checkpoint:
      directory: checkpoints   # checkpoint root (relative to the working directory)
      every_n_steps: 1000      # save rule; null to disable
      every_n_seconds: null    # save rule (wall clock)
      keep_last: null          # retention; all null: keep everything
      keep_every_n_steps: null
      keep_best: null          # {metric: val_loss, mode: min, n: 1}
      async_save: true         # write in a background thread
      handle_preemption: false # save and stop on SIGTERM / SIGINT
      incremental: false       # write only changed chunks ...
      full_every: 10           # ... with every full_every-th save full
      compression: null        # null, zstd, blosc or bytegroup

Reading YAML files and command-line overrides is not jckpt's job: the
examples use ``examples/configlib.py`` (a small dataclass loader); any loader
that builds dataclasses works. An invalid value raises :class:`ConfigError`,
whose ``key`` names the field, so a loader can point at the exact entry.

Example::

    cfg = CheckpointConfig(every_n_steps=100, keep_last=3, compression="zstd")
    mngr = jckpt.CheckpointManager(cfg.directory, policy=cfg.policy(), options=cfg.save_options())
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jckpt import policy as P
from jckpt import storage
from jckpt.write import SaveOptions

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "KeepBestConfig",
]


class ConfigError(ValueError):
    """A config value is invalid.

    Attributes:
      key: the name of the offending field of the dataclass that raised it.
      problem: what is wrong with it.
    """

    def __init__(self, problem: str, *, key: str = ""):
        self.problem, self.key = problem, key
        super().__init__(f"{key}: {problem}" if key else problem)


def _invalid(key: str, problem: str) -> ConfigError:
    return ConfigError(problem, key=key)


# ----------------------------------------------------------------- the configs


@dataclasses.dataclass(frozen=True)
class KeepBestConfig:
    """Keep the ``n`` checkpoints with the best ``metric`` (``jckpt.policy.keep_best``).

    Attributes:
      metric: a key of the metrics passed with each save, e.g. ``val_loss``.
      mode: ``min`` (lower is better) or ``max``.
      n: how many to keep, >= 1.
    """

    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    n: int = 1

    def __post_init__(self) -> None:
        if not self.metric:
            raise _invalid("metric", "must be a non-empty metric name")
        if self.mode not in ("min", "max"):
            raise _invalid("mode", f"must be 'min' or 'max'; got {self.mode!r}")
        if self.n < 1:
            raise _invalid("n", f"must be >= 1, got {self.n}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save, what to keep and how to write: the ``checkpoint:`` section.

    Save rules fire if any does; with none set the manager saves at every
    ``maybe_save``.  Retention keeps the union of the rules; with none set,
    everything is kept.  See docs/policies.md.

    Attributes:
      directory: the checkpoint root (a path, relative to the working directory).
      every_n_steps: save at steps that are multiples of it; None: no such rule.
      every_n_seconds: save when this much (manager-clock) time has passed.
      keep_last: keep the most recent N checkpoints.
      keep_every_n_steps: keep checkpoints at multiples of N (permanent ones).
      keep_best: keep the best N by a metric (:class:`KeepBestConfig`).
      async_save: hash and write in a background thread; the loop only waits
        for the device-to-host copy.
      handle_preemption: on SIGTERM/SIGINT save at the next ``maybe_save`` and
        tell the loop to stop.
      incremental: write only the chunks that changed since the previous
        save; every ``full_every``-th save is full.
      full_every: the period of full saves when ``incremental`` is on, >= 1.
      compression: None, ``zstd``, ``blosc`` or ``bytegroup`` (lossless).
    """

    directory: str = "checkpoints"
    every_n_steps: int | None = 1000
    every_n_seconds: float | None = None
    keep_last: int | None = None
    keep_every_n_steps: int | None = None
    keep_best: KeepBestConfig | None = None
    async_save: bool = True
    handle_preemption: bool = False
    incremental: bool = False
    full_every: int = 10
    compression: str | None = None

    def __post_init__(self) -> None:
        if not self.directory:
            raise _invalid("directory", "must be a non-empty path")
        for name in ("every_n_steps", "keep_last", "keep_every_n_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise _invalid(name, f"must be >= 1 or null, got {value}")
        if self.every_n_seconds is not None and not self.every_n_seconds > 0:
            raise _invalid("every_n_seconds", f"must be > 0 or null, got {self.every_n_seconds}")
        if self.full_every < 1:
            raise _invalid("full_every", f"must be >= 1, got {self.full_every}")
        if self.compression not in storage.COMPRESSION_CODECS:
            names = ", ".join(str(c) if c else "null" for c in storage.COMPRESSION_CODECS)
            raise _invalid("compression", f"must be one of {names}; got {self.compression!r}")

    def policy(self) -> P.Policy:
        """The ``jckpt.policy.Policy`` these settings describe (save, kind and retention rules).

        Example::

            CheckpointConfig(every_n_steps=100, keep_last=3).policy()
            # == policy.combine(policy.every_n_steps(100), policy.keep_last(3))
        """
        rules = []
        if self.every_n_steps is not None:
            rules.append(P.every_n_steps(self.every_n_steps))
        if self.every_n_seconds is not None:
            rules.append(P.every_n_seconds(self.every_n_seconds))
        if self.incremental:
            rules.append(P.incremental(full_every=self.full_every))
        if self.keep_last is not None:
            rules.append(P.keep_last(self.keep_last))
        if self.keep_every_n_steps is not None:
            rules.append(P.keep_every_n_steps(self.keep_every_n_steps))
        if self.keep_best is not None:
            best = self.keep_best
            rules.append(P.keep_best(best.metric, mode=best.mode, n=best.n))
        return P.combine(*rules)

    def save_options(self) -> SaveOptions:
        """The ``jckpt.SaveOptions`` of these settings (compression)."""
        return SaveOptions(compression=self.compression)
