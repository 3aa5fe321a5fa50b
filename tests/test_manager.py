"""Specification of jckpt.CheckpointManager: async saves, errors, retention, resume, preemption."""

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jckpt
from jckpt import CheckpointManager, CheckpointSaveError
from jckpt import policy as P


class FakeClock:
    """A manager clock that moves only when the test advances it."""

    def __init__(self, start=0.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def small_state(i):
    return {"w": np.full((4,), float(i), np.float32), "step": i}


def run(mngr, steps, metrics=None, clock=None, dt=0.0):
    """maybe_save over ``steps`` with small states; returns the steps that started a save."""
    started = []
    for k, step in enumerate(steps):
        m = None if metrics is None else {"loss": metrics[k]}
        if mngr.maybe_save(step, small_state(step), metrics=m):
            started.append(step)
        if clock is not None:
            clock.advance(dt)
    mngr.wait()
    return started


# ------------------------------------------------------------------ basics


@pytest.mark.parametrize("async_save", [True, False])
def test_default_policy_saves_every_call_and_keeps_everything(tmp_path, async_save):
    with CheckpointManager(tmp_path, async_save=async_save) as mngr:
        assert run(mngr, range(4)) == [0, 1, 2, 3]
        assert mngr.all_steps() == [0, 1, 2, 3] == jckpt.all_steps(tmp_path)
        assert mngr.latest_step() == 3
    np.testing.assert_array_equal(jckpt.restore(tmp_path, step=2)["w"], np.full((4,), 2.0))


@pytest.mark.parametrize("async_save", [True, False])
def test_issue_retention_case_on_disk(tmp_path, async_save):
    policy = P.combine(P.every_n_steps(2), P.keep_last(2), P.keep_every_n_steps(4))
    with CheckpointManager(tmp_path, policy=policy, async_save=async_save) as mngr:
        assert run(mngr, range(12)) == [0, 2, 4, 6, 8, 10]
    assert jckpt.all_steps(tmp_path) == [0, 4, 8, 10]


def test_existing_step_is_skipped_by_maybe_save_and_refused_by_save(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.maybe_save(3, small_state(3))
        assert not mngr.maybe_save(3, small_state(99))  # in flight or committed: skipped
        with pytest.raises(jckpt.StepExistsError, match="step 3"):
            mngr.save(3, small_state(99))
    assert jckpt.restore(tmp_path, step=3)["step"] == 3


def test_metrics_and_metadata_are_stored(tmp_path):
    with CheckpointManager(tmp_path, clock=FakeClock(start=123.0)) as mngr:
        mngr.save(0, small_state(0), {"loss": jnp.float32(0.5)}, metadata={"run": "a"})
        with pytest.raises(ValueError, match="reserved"):
            mngr.save(1, small_state(1), metadata={"jckpt": 1})
    info = jckpt.info(tmp_path, 0)
    assert info.metrics == {"loss": 0.5}
    assert info.metadata["run"] == "a"
    assert info.created == 123.0 and info.metadata["jckpt"]["time"] == 123.0


def test_incremental_kind_reaches_the_store(tmp_path):
    policy = P.combine(P.every_n_steps(1), P.incremental(full_every=2))
    with CheckpointManager(tmp_path, policy=policy) as mngr:
        run(mngr, range(4))
    kinds = [jckpt.info(tmp_path, s).kind for s in range(4)]
    assert kinds == ["full", "incremental", "full", "incremental"]


def test_best_step(tmp_path):
    policy = P.combine(P.every_n_steps(1), P.keep_best("loss", "min", 2))
    with CheckpointManager(tmp_path, policy=policy) as mngr:
        run(mngr, range(6), metrics=[5, 1, 4, 3, 6, 2])
        assert mngr.all_steps() == [1, 5]
        assert mngr.best_step() == 1
    assert CheckpointManager(tmp_path).best_step() is None  # default policy has no metric


def test_closed_manager_refuses_saves(tmp_path):
    mngr = CheckpointManager(tmp_path)
    mngr.close()
    mngr.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        mngr.maybe_save(0, small_state(0))


# ------------------------------------------------------ the snapshot is taken at call time


class HeldWrites:
    """Holds each background write of ``mngr`` until the test lets it go.

    While a write is held, whatever the test does next happens while that save
    is in flight, so the race a test asserts about really happens, every run.
    Leaving the ``with`` block lets every write go (so a failing test does not
    hang in the manager's ``close``).
    """

    def __init__(self, mngr, monkeypatch):
        self._started = queue.Queue()
        self._cond = threading.Condition()
        self._permits, self._done = 0, False
        write = mngr._write  # the manager's background thread calls it for every async save

        def held(*args):
            self._started.put(args[0])  # the step
            with self._cond:
                if not self._cond.wait_for(lambda: self._permits or self._done, timeout=60):
                    raise TimeoutError("the test never let the write go")
                self._permits = max(0, self._permits - 1)
            return write(*args)

        monkeypatch.setattr(mngr, "_write", held)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def next_started(self):
        """Waits until the next write has started (and is held); returns its step."""
        return self._started.get(timeout=60)

    def let_go(self):
        """Lets the held write (or the next one) run."""
        with self._cond:
            self._permits += 1
            self._cond.notify_all()


def _sharded(x):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    spec = jax.sharding.PartitionSpec("a", "b")
    return jax.device_put(x.reshape(64, 64), jax.sharding.NamedSharding(mesh, spec))


@pytest.mark.parametrize("layout", ["one device", "sharded 4x2"])
def test_donated_jax_buffers_after_maybe_save(tmp_path, monkeypatch, layout):
    step_fn = jax.jit(lambda s: jax.tree.map(lambda x: x + 1.0, s), donate_argnums=0)
    w = jnp.zeros((64 * 64,), jnp.float32)
    state = {"w": w if layout == "one device" else _sharded(w), "b": jnp.zeros((8,), jnp.float32)}
    with CheckpointManager(tmp_path) as mngr, HeldWrites(mngr, monkeypatch) as writes:
        for step in range(3):
            assert mngr.maybe_save(step, state)
            assert writes.next_started() == step
            state = step_fn(state)  # donates the buffers maybe_save just saw, while they are written
            writes.let_go()
    for step in range(3):
        restored = jckpt.restore(tmp_path, step=step)
        w = np.asarray(restored["w"])
        assert w.min() == w.max() == step
        assert float(restored["b"][3]) == step


def test_numpy_mutation_after_maybe_save(tmp_path, monkeypatch):
    buf = np.zeros((4096,), np.float32)
    with CheckpointManager(tmp_path) as mngr, HeldWrites(mngr, monkeypatch) as writes:
        for step in range(3):
            assert mngr.maybe_save(step, {"buf": buf})
            assert writes.next_started() == step
            buf += 1.0  # while the save of `step` is in flight
            writes.let_go()
    for step in range(3):
        restored = jckpt.restore(tmp_path, step=step)["buf"]
        assert restored.min() == restored.max() == step


def test_mixed_state_mutated_and_donated_after_maybe_save(tmp_path, monkeypatch):
    step_fn = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    state = {"host": np.zeros((4096,), np.float32), "dev": jnp.zeros((4096,), jnp.float32)}
    with CheckpointManager(tmp_path) as mngr, HeldWrites(mngr, monkeypatch) as writes:
        for step in range(3):
            assert mngr.maybe_save(step, state)
            assert writes.next_started() == step
            state["host"] += 1.0
            state["dev"] = step_fn(state["dev"])
            writes.let_go()
    for step in range(3):
        restored = jckpt.restore(tmp_path, step=step)
        assert restored["host"].max() == restored["dev"].max() == step


def test_back_pressure_one_save_in_flight(tmp_path, monkeypatch):
    returned = []
    with CheckpointManager(tmp_path) as mngr, HeldWrites(mngr, monkeypatch) as writes:
        assert mngr.maybe_save(0, small_state(0))
        assert writes.next_started() == 0
        second = threading.Thread(target=lambda: returned.append(mngr.maybe_save(1, small_state(1))))
        second.start()
        # A maybe_save that does not wait returns well within this; one that waits never does.
        second.join(0.5)
        assert not returned, "maybe_save(1) returned while the save of step 0 was in flight"
        writes.let_go()
        second.join(60)
        assert returned == [True]
        assert jckpt.all_steps(tmp_path) == [0]  # it waited for step 0's commit
        assert writes.next_started() == 1
        writes.let_go()
    assert jckpt.all_steps(tmp_path) == [0, 1]


# ------------------------------------------------------------ background errors


def block_step_dir(root, step):
    """A regular file where a step's directory must go: writing that step fails."""
    os.makedirs(root, exist_ok=True)
    (root / f"step_{step:08d}").write_text("in the way")


@pytest.mark.parametrize("surfaced_by", ["maybe_save", "save", "wait", "close"])
def test_background_error_surfaces_with_cause_and_step_never_appears(tmp_path, surfaced_by):
    mngr = CheckpointManager(tmp_path)
    mngr.save(0, small_state(0))
    mngr.wait()
    block_step_dir(tmp_path, 1)
    assert mngr.maybe_save(1, small_state(1))  # started; fails in the background
    with pytest.raises(CheckpointSaveError, match="step 1") as raised:
        if surfaced_by == "maybe_save":
            mngr.maybe_save(2, small_state(2))
            mngr.maybe_save(3, small_state(3))  # the failure is reported by now
        elif surfaced_by == "save":
            mngr.save(2, small_state(2))
        elif surfaced_by == "wait":
            mngr.wait()
        else:
            mngr.close()
    assert raised.value.step == 1
    assert isinstance(raised.value.__cause__, OSError)
    assert 1 not in jckpt.all_steps(tmp_path) and 1 not in mngr.all_steps()
    mngr.close()


def test_manager_keeps_working_after_a_failed_save(tmp_path):
    clock = FakeClock()
    mngr = CheckpointManager(tmp_path, policy=P.every_n_seconds(100), clock=clock)
    assert mngr.maybe_save(0, small_state(0))
    mngr.wait()
    block_step_dir(tmp_path, 1)
    clock.advance(100)
    assert mngr.maybe_save(1, small_state(1))  # fails in the background
    clock.advance(10)
    with pytest.raises(CheckpointSaveError):
        mngr.wait()
    # The failed save did not restart the 100 s timer: the next call saves.
    assert mngr.maybe_save(2, small_state(2))
    mngr.close()
    assert jckpt.all_steps(tmp_path) == [0, 2]


@pytest.mark.parametrize("async_save", [True, False])
def test_policy_state_is_what_a_restart_rebuilds(tmp_path, async_save):
    clock = FakeClock()
    policy = P.combine(
        P.every_n_steps(3), P.young_daly(3600), P.best_only("loss"), P.incremental(3), P.keep_last(2)
    )
    with CheckpointManager(tmp_path, policy=policy, clock=clock, async_save=async_save) as mngr:
        run(mngr, range(10), metrics=[5, 1, 4, 3, 6, 2, 0.5, 7, 0.4, 9], clock=clock, dt=30)
        history = [jckpt.info(tmp_path, s) for s in jckpt.all_steps(tmp_path)]
        assert len(history) == 2
        assert mngr.policy_state == P.resume(policy, history)


# --------------------------------------------------------------------- retention


def test_retention_never_deletes_the_last_checkpoint(tmp_path):
    with CheckpointManager(tmp_path, policy=P.keep_every_n_steps(10)) as mngr:
        run(mngr, [1, 2, 3])
    assert jckpt.all_steps(tmp_path) == [3]


class Gated:
    """A `like` whose flattening waits for a gate: holds a restore between manifest and data."""

    def __init__(self, x, gate=None):
        self.x, self.gate = x, gate


def _gated_flatten(g):
    if g.gate is not None:
        g.gate[0].set()  # restore has picked its step and read the manifest
        g.gate[1].wait(30)
    return [(jax.tree_util.GetAttrKey("x"), g.x)], None


jax.tree_util.register_pytree_with_keys(Gated, _gated_flatten, lambda _, children: Gated(children[0]))


def test_retention_spares_the_step_being_restored(tmp_path):
    mngr = CheckpointManager(tmp_path, policy=P.keep_last(1))
    big = np.arange(1 << 20, dtype=np.float32)
    mngr.save(0, {"x": big})
    mngr.wait()
    entered, release = threading.Event(), threading.Event()
    result = {}
    reader = threading.Thread(
        target=lambda: result.setdefault("x", mngr.restore(like=Gated(big, (entered, release))))
    )
    reader.start()
    assert entered.wait(30)
    mngr.save(1, {"x": big + 1})  # keep_last(1) would delete step 0 after this commit
    mngr.wait()
    assert jckpt.all_steps(tmp_path) == [0, 1]  # step 0 is being read
    release.set()
    reader.join(30)
    np.testing.assert_array_equal(result["x"].x, big)
    mngr.save(2, {"x": big + 2})
    mngr.close()
    assert jckpt.all_steps(tmp_path) == [2]


# ------------------------------------------------------------------------- resume


class TrainState(NamedTuple):
    params: dict
    step: jax.Array


def init_state():
    return TrainState({"w": jnp.zeros((3,), jnp.float32)}, jnp.array(0, jnp.int32))


def test_restore_or_init(tmp_path):
    calls = []

    def init():
        calls.append(1)
        return init_state()

    with CheckpointManager(tmp_path) as mngr:
        state, step = mngr.restore_or_init(init)
        assert step is None and len(calls) == 1
        state = TrainState({"w": state.params["w"] + 7}, state.step + 5)
        mngr.save(5, state)
    with CheckpointManager(tmp_path) as mngr:
        state, step = mngr.restore_or_init(init)
    assert step == 5
    assert isinstance(state, TrainState)
    np.testing.assert_array_equal(state.params["w"], np.full((3,), 7.0))
    assert int(state.step) == 5


def test_resume_picks_up_existing_checkpoints_and_policy_state(tmp_path):
    policy = P.combine(P.every_n_seconds(3600), P.keep_last(2))
    clock = FakeClock()
    with CheckpointManager(tmp_path, policy=policy, clock=clock) as mngr:
        assert run(mngr, range(0, 3), clock=clock, dt=1800) == [0, 2]
    with CheckpointManager(tmp_path, policy=policy, clock=clock) as mngr:
        assert mngr.latest_step() == 2 and mngr.all_steps() == [0, 2]
        # 1800 s since the save of step 2: not yet; then every other step as before.
        assert run(mngr, range(3, 8), clock=clock, dt=1800) == [4, 6]
        assert mngr.all_steps() == [4, 6]  # keep_last(2) applies to the old run's steps too


def test_resume_keep_best_restarted_halfway(tmp_path):
    policy = P.combine(P.every_n_steps(1), P.keep_best("loss", "min", 2))
    losses = [5, 1, 4, 3, 6, 2]
    with CheckpointManager(tmp_path, policy=policy) as mngr:
        run(mngr, range(3), metrics=losses[:3])
    with CheckpointManager(tmp_path, policy=policy) as mngr:
        _, step = mngr.restore_or_init(lambda: small_state(0), like=small_state(0))
        run(mngr, range(step + 1, 6), metrics=losses[step + 1 :])
    assert jckpt.all_steps(tmp_path) == [1, 5]


def test_resume_counts_incremental_saves_across_restarts(tmp_path):
    # The count since the last full save is 2 at the restart, but only one
    # incremental checkpoint survives keep_last(1): it must come from the metadata.
    policy = P.combine(P.every_n_steps(1), P.incremental(full_every=4), P.keep_last(1))
    with CheckpointManager(tmp_path, policy=policy) as mngr:
        run(mngr, range(3))  # full, incremental, incremental
    assert jckpt.all_steps(tmp_path) == [2]
    with CheckpointManager(tmp_path, policy=policy) as mngr:
        run(mngr, range(3, 5))
    assert [jckpt.info(tmp_path, 4).kind] == ["full"]  # full, inc, inc, inc, full


# --------------------------------------------------------------------- preemption


def test_notify_preemption_saves_next_call_and_stops(tmp_path):
    with CheckpointManager(tmp_path, policy=P.every_n_steps(100)) as mngr:
        assert mngr.maybe_save(0, small_state(0))
        assert not mngr.maybe_save(1, small_state(1)) and not mngr.should_stop()
        mngr.notify_preemption()
        assert not mngr.should_stop()  # not before the state is saved
        assert mngr.maybe_save(2, small_state(2))
        assert mngr.should_stop()
    assert jckpt.all_steps(tmp_path) == [0, 2]


def test_signal_handlers_are_removed_on_close(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    mngr = CheckpointManager(tmp_path, handle_preemption=True)
    assert signal.getsignal(signal.SIGTERM) is not before
    mngr.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_interrupts_as_usual(tmp_path):
    with CheckpointManager(tmp_path, policy=P.every_n_steps(100), handle_preemption=True) as mngr:
        os.kill(os.getpid(), signal.SIGINT)  # first: a preemption request
        assert mngr.maybe_save(1, small_state(1)) and mngr.should_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: interrupt
            for _ in range(100):
                time.sleep(0.01)


def test_preemption_handlers_need_the_main_thread(tmp_path):
    errors = []

    def make():
        try:
            CheckpointManager(tmp_path, handle_preemption=True)
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import jckpt
    from jckpt import policy as P
    from jckpt import CheckpointManager

    mngr = CheckpointManager(sys.argv[1], policy=P.every_n_steps(1000), handle_preemption=True)
    step = 0
    while step < 100000:
        state = {"w": np.full((16,), float(step), np.float32), "step": step}
        mngr.maybe_save(step, state)
        if mngr.should_stop():
            break
        if step == 3:
            print("ready", flush=True)
        time.sleep(0.01)
        step += 1
    mngr.close()
    print("stopped", step, flush=True)
    """
)


@pytest.mark.slow
def test_sigterm_in_a_subprocess_saves_and_stops(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "ckpt")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0
    stopped_at = int(out.split()[-1])
    assert stopped_at > 3
    assert jckpt.all_steps(tmp_path / "ckpt") == [0, stopped_at]
    restored = jckpt.restore(tmp_path / "ckpt")
    assert restored["step"] == stopped_at and restored["w"][0] == stopped_at
