"""Young-Daly vs fixed checkpoint intervals: a failure simulation with a measured save cost.

Run ``python benchmarks/young_daly_sim.py`` (``--help`` for options). Results
are in docs/policies.md ("Measured: Young-Daly").

Method
------
1. Measure: save a ``--mib`` MiB state (4 float32 jax arrays) ``--measure``
   times with ``jckpt.save`` (synchronous, durable) and restore it as many
   times; the durations are the save cost ``C`` and restart cost ``R`` used
   below (each simulated save or restart draws one of the measured values).
   ``--cost``/``--restart`` replace the measurement.
2. Simulate ``--jobs`` jobs of ``--hours`` hours of useful compute in steps of
   ``--dt`` seconds. Failures arrive as a Poisson process with mean
   ``--mtbf`` seconds (the same failure times for every strategy within a job:
   common random numbers). A failure, also one during a save, loses everything
   since the last *committed* checkpoint; the job restarts after ``R`` seconds
   from that checkpoint, with the policy state rebuilt by
   ``jckpt.policy.resume`` from the committed checkpoints, exactly as
   ``CheckpointManager`` does.
3. Strategies are real ``jckpt.policy`` objects driven by ``decide``/``update``:
   ``every_n_seconds(T)`` for T = T*/8 ... 8T* (T* = sqrt(2·C·MTBF) from the
   median measured C) and ``young_daly(MTBF)``, which measures C itself from
   the simulated saves.
4. Reported: wasted time as a percentage of the useful compute (checkpointing +
   lost work + restarts), mean over jobs, and the expected waste
   ``C/T + (T/2 + R)/MTBF`` of the first-order model.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import numpy as np

from jckpt import policy as P


def measure(mib: int, n: int) -> tuple[list[float], list[float]]:
    import jax
    import jax.numpy as jnp

    import jckpt

    rows = mib * 2**20 // 4 // 4096 // 4
    state = {f"w{i}": jnp.full((rows, 4096), float(i), jnp.float32) for i in range(4)}
    jax.block_until_ready(state)
    like = jax.eval_shape(lambda: state)
    saves, restores = [], []
    with tempfile.TemporaryDirectory(prefix="jckpt_yd_") as d:
        jckpt.save(f"{d}/warmup", state, step=0)
        for i in range(n):
            t = time.perf_counter()
            jckpt.save(d + "/run", state, step=i)
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            jax.block_until_ready(jckpt.restore(d + "/run", like, step=i))
            restores.append(time.perf_counter() - t)
    return saves, restores


def simulate_job(policy, *, work, dt, failures, costs, restarts, rng) -> dict:
    """One job under one policy. Returns seconds spent saving, lost, restarting, and wall."""
    total_steps = int(round(work / dt))
    t, step = 0.0, 0
    history: list[P.Saved] = []
    state = P.resume(policy, history)
    fail_iter = iter(failures)
    next_failure = next(fail_iter)
    saving = lost = restarting = 0.0
    saves = 0

    def fail() -> None:
        """The failure at ``next_failure``: restart from the last committed checkpoint."""
        nonlocal t, step, state, next_failure, restarting
        t = next_failure
        r = float(rng.choice(restarts))
        t += r
        restarting += r
        step = history[-1].step if history else 0
        state = P.resume(policy, history)
        next_failure = next(fail_iter)
        while next_failure <= t:  # failures during the restart only delay it
            next_failure = next(fail_iter)

    while step < total_steps:
        if t + dt >= next_failure:  # fails mid-step
            done = step - (history[-1].step if history else 0)
            lost += done * dt + (next_failure - t)
            fail()
            continue
        t += dt
        step += 1
        event = P.Event(step, now=t)
        if not P.decide(policy, state, event).save:
            continue
        c = float(rng.choice(costs))
        if t + c >= next_failure:  # fails while saving: the save never commits
            saving += next_failure - t
            lost += (step - (history[-1].step if history else 0)) * dt
            fail()
            continue
        record = P.Saved(step, metadata=P.save_metadata(state, event), created=t, save_seconds=c)
        t += c
        saving += c
        saves += 1
        state = policy.update(state, record)
        history = [record]  # only the newest checkpoint matters here (keep_last(1))
    return {"wall": t, "saving": saving, "lost": lost, "restarting": restarting, "saves": saves}


def failure_times(rng, mtbf: float, horizon: float) -> list[float]:
    times, t = [], 0.0
    while t < horizon:
        t += rng.exponential(mtbf)
        times.append(t)
    times.append(math.inf)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="state size for the measurement")
    ap.add_argument("--measure", type=int, default=5, help="measured saves/restores")
    ap.add_argument("--cost", type=float, default=None, help="save cost C in s (skip measuring)")
    ap.add_argument("--restart", type=float, default=None, help="restart cost R in s")
    ap.add_argument("--mtbf", type=float, default=3600.0, help="mean time between failures, s")
    ap.add_argument("--hours", type=float, default=24.0, help="useful compute per job")
    ap.add_argument("--dt", type=float, default=1.0, help="step time, s")
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.cost is None or args.restart is None:
        saves, restores = measure(args.mib, args.measure)
        print(
            f"measured on {args.mib} MiB: save {statistics.median(saves):.3f} s "
            f"(min {min(saves):.3f}, max {max(saves):.3f}), restore "
            f"{statistics.median(restores):.3f} s (median of {args.measure})"
        )
    costs = [args.cost] if args.cost is not None else saves
    restarts = [args.restart] if args.restart is not None else restores
    c, r, m = statistics.median(costs), statistics.median(restarts), args.mtbf
    t_star = P.young_daly_interval(c, m)
    work = args.hours * 3600
    print(
        f"C = {c:.3f} s, R = {r:.3f} s, MTBF = {m:.0f} s -> T* = sqrt(2·C·MTBF) = {t_star:.1f} s; "
        f"{args.jobs} jobs x {args.hours:g} h of compute, steps of {args.dt:g} s"
    )

    factors = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
    strategies = [
        (f"every_n_seconds({f * t_star:.1f}) = {f:g}·T*", P.every_n_seconds(f * t_star), f * t_star)
        for f in factors
    ]
    strategies.append(("young_daly(MTBF), C measured", P.young_daly(m), None))

    master = np.random.default_rng(args.seed)
    jobs = []
    for _ in range(args.jobs):
        seed = int(master.integers(2**32))
        fails = failure_times(np.random.default_rng(seed), m, work * 20)
        jobs.append((seed, fails))

    print()
    print("| strategy | saves/job | checkpointing | lost work | restarts | **total waste** | model |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name, policy, interval in strategies:
        sums = {"saving": [], "lost": [], "restarting": [], "saves": [], "wall": []}
        for seed, fails in jobs:
            out = simulate_job(
                policy,
                work=work,
                dt=args.dt,
                failures=fails,
                costs=costs,
                restarts=restarts,
                rng=np.random.default_rng(seed + 1),
            )
            for k in sums:
                sums[k].append(out[k])
        pct = {k: 100 * statistics.mean(v) / work for k, v in sums.items()}
        waste = pct["saving"] + pct["lost"] + pct["restarting"]
        model = f"{100 * (c / interval + (interval / 2 + r) / m):.2f}%" if interval else "–"
        rows[name] = waste
        print(
            f"| {name} | {statistics.mean(sums['saves']):.0f} | {pct['saving']:.2f}% | "
            f"{pct['lost']:.2f}% | {pct['restarting']:.2f}% | **{waste:.2f}%** | {model} |"
        )
    best_fixed = min(v for k, v in rows.items() if "young_daly" not in k)
    yd = rows[strategies[-1][0]]
    print()
    print(
        f"young_daly waste {yd:.2f}% vs best fixed interval {best_fixed:.2f}% (ratio {yd / best_fixed:.3f})"
    )


if __name__ == "__main__":
    main()
