"""Specification of jckpt.policy: save, kind and retention rules, pure and restartable."""

import inspect
import json
import math
import re
import time
from pathlib import Path

import pytest

from jckpt import policy as P
from jckpt.policy import Event, Saved


def steps(n, start=0, dt=0.0, metrics=None):
    """Events for steps start..start+n-1, ``dt`` seconds apart, optional metric list."""
    out = []
    for i in range(n):
        m = None if metrics is None else metrics[i]
        out.append(Event(step=start + i, now=dt * (start + i), metrics=m))
    return out


def losses(values, name="loss"):
    return [None if v is None else {name: v} for v in values]


# ---------------------------------------------------------------- save decisions

SAVE_CASES = [
    # id, policy, events, saved steps
    ("every_n_steps(2) over 0-5", P.every_n_steps(2), steps(6), [0, 2, 4]),
    ("every_n_steps(3) from 1", P.every_n_steps(3), steps(10, start=1), [3, 6, 9]),
    ("every_n_steps(1)", P.every_n_steps(1), steps(4), [0, 1, 2, 3]),
    (
        "every_n_seconds(3600), +1800 s/step",
        P.every_n_seconds(3600),
        steps(8, dt=1800),
        [0, 2, 4, 6],
    ),
    (
        "every_n_seconds irregular clock",
        P.every_n_seconds(10),
        [Event(s, t) for s, t in enumerate([0.0, 3.0, 9.9, 10.0, 25.0, 26.0])],
        [0, 3, 4],
    ),
    ("on_steps", P.on_steps([1, 4, 99]), steps(6), [1, 4]),
    (
        "on_preemption",
        P.on_preemption(),
        [Event(0, 0.0), Event(1, 0.0), Event(2, 0.0, preempted=True), Event(3, 0.0)],
        [2],
    ),
    (
        "best_only min",
        P.best_only("loss"),
        steps(5, metrics=losses([5, 1, 4, 0.5, 0.5])),
        [0, 1, 3],
    ),
    (
        "best_only max",
        P.best_only("acc", mode="max"),
        steps(4, metrics=losses([0.1, 0.3, 0.2, 0.4], "acc")),
        [0, 1, 3],
    ),
    (
        "best_only skips missing and NaN",
        P.best_only("loss"),
        steps(5, metrics=[None, {"loss": math.nan}, {"acc": 1.0}, {"loss": 2.0}, {"loss": 3.0}]),
        [3],
    ),
    # C = 2 s, MTBF = 1 h -> interval sqrt(2*2*3600) = 120 s; events 50 s apart.
    ("young_daly fixed cost", P.young_daly(3600, cost_seconds=2.0), steps(11, dt=50), [0, 3, 6, 9]),
    (
        "combine: any save rule",
        P.combine(P.every_n_steps(5), P.on_steps([7])),
        steps(11),
        [0, 5, 7, 10],
    ),
    (
        "combine: preemption between regular saves",
        P.combine(P.every_n_steps(2), P.on_preemption()),
        [Event(s, 0.0, preempted=(s == 3)) for s in range(5)],
        [0, 2, 3, 4],
    ),
    ("no save rule: save at every event", P.keep_last(2), steps(4), [0, 1, 2, 3]),
    ("combine without save rule", P.combine(P.keep_last(1), P.incremental(2)), steps(3), [0, 1, 2]),
]


@pytest.mark.parametrize(
    "policy, events, expected", [c[1:] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES]
)
def test_save_decisions(policy, events, expected):
    assert P.simulate(policy, events).saved == expected


@pytest.mark.parametrize(
    "save_seconds, expected",
    [(2.0, [0, 12, 24, 36]), (8.0, [0, 24]), (0.5, [0, 6, 12, 18, 24, 30, 36])],
)
def test_young_daly_interval_follows_measured_cost(save_seconds, expected):
    # MTBF 1 h; events every 10 s over 400 s; interval = sqrt(2 * C * 3600).
    run = P.simulate(P.young_daly(3600), steps(41, dt=10), save_seconds=save_seconds)
    assert run.saved == expected


def test_young_daly_interval_formula():
    assert P.young_daly_interval(2.0, 3600.0) == pytest.approx(120.0)
    assert P.young_daly_interval(0.0, 3600.0) == 0.0


def test_young_daly_cost_is_blocking_time_for_async_saves():
    # Async save: 0.5 s blocking, 30 s in the background -> C is 0.5 s, not 30 s.
    async_save = Saved(0, save_seconds=30.0, metadata=_meta(blocking=0.5, is_async=True))
    sync_save = Saved(0, save_seconds=30.0, metadata=_meta(blocking=0.5, is_async=False))
    plain_save = Saved(0, save_seconds=30.0)
    # Async, but the write competes with training for the same CPU: all of it counts.
    shared = Saved(0, save_seconds=30.0, metadata=_meta(blocking=0.5, is_async=True, shared=True))
    assert P.save_cost(async_save) == 0.5
    assert P.save_cost(sync_save) == 30.5
    assert P.save_cost(plain_save) == 30.0
    assert P.save_cost(shared) == 30.5
    state = P.young_daly(3600).init([async_save])
    assert state.cost == 0.5


def _meta(blocking, is_async, time_=0.0, shared=False):
    return {"jckpt": {"time": time_, "blocking_seconds": blocking, "async": is_async, "shared_cpu": shared}}


# ------------------------------------------------------------------------- kinds

KIND_CASES = [
    ("incremental(3)", P.incremental(3), 7, ["full", "incremental", "incremental"] * 2 + ["full"]),
    ("incremental(1) is always full", P.incremental(1), 3, ["full"] * 3),
    ("no kind rule: full", P.every_n_steps(1), 3, ["full"] * 3),
    (
        "two kind rules: full wins",
        P.combine(P.incremental(2), P.incremental(3)),
        5,
        ["full", "incremental", "full", "incremental", "full"],
    ),
]


@pytest.mark.parametrize("policy, n, expected", [c[1:] for c in KIND_CASES], ids=[c[0] for c in KIND_CASES])
def test_kinds(policy, n, expected):
    assert P.simulate(P.combine(P.every_n_steps(1), policy), steps(n)).kinds == expected


def test_incremental_counts_from_what_was_written():
    # Asked for incremental, the store wrote full: the count restarts there.
    pol = P.incremental(3)
    state = pol.update(pol.update(pol.init(()), Saved(0, kind="full")), Saved(1, kind="full"))
    assert pol.kind(state, Event(2, 0.0)) == "incremental"


# --------------------------------------------------------------------- retention

KEEP_CASES = [
    (
        "combine(every_n_steps(2), keep_last(2), keep_every_n_steps(4)) over 0-11",
        P.combine(P.every_n_steps(2), P.keep_last(2), P.keep_every_n_steps(4)),
        steps(12),
        [0, 4, 8, 10],
    ),
    (
        "combine(every_n_steps(1), keep_best(loss, min, 2))",
        P.combine(P.every_n_steps(1), P.keep_best("loss", "min", 2)),
        steps(6, metrics=losses([5, 1, 4, 3, 6, 2])),
        [1, 5],
    ),
    (
        "keep_best max",
        P.keep_best("acc", "max", 2),
        steps(5, metrics=losses([0.5, 0.9, 0.1, 0.7, 0.8], "acc")),
        [1, 4],
    ),
    (
        "keep_best keeps steps without the metric",
        P.keep_best("loss", "min", 1),
        steps(6, metrics=losses([3, None, 1, 2, None, 0.5])),
        [1, 4, 5],
    ),
    (
        "keep_best ranks NaN last",
        P.keep_best("loss", "min", 2),
        steps(3, metrics=losses([math.nan, 1, 2])),
        [1, 2],
    ),
    (
        "keep_best ties go to the earlier step",
        P.keep_best("loss"),
        steps(3, metrics=losses([1, 1, 1])),
        [0],
    ),
    ("keep_last(3)", P.keep_last(3), steps(10), [7, 8, 9]),
    ("keep_every_n_steps(3)", P.keep_every_n_steps(3), steps(10), [0, 3, 6, 9]),
    ("keep_every_n_seconds(3600)", P.keep_every_n_seconds(3600), steps(6, dt=1500), [0, 3]),
    (
        "keep_every_n_seconds + keep_last(1)",
        P.combine(P.keep_every_n_seconds(3600), P.keep_last(1)),
        steps(6, dt=1500),
        [0, 3, 5],
    ),
    ("no retention rule keeps all", P.every_n_steps(2), steps(7), [0, 2, 4, 6]),
    (
        "union of keep_last and keep_best",
        P.combine(P.keep_last(1), P.keep_best("loss")),
        steps(4, metrics=losses([2, 0, 3, 4])),
        [1, 3],
    ),
]


@pytest.mark.parametrize(
    "policy, events, expected", [c[1:] for c in KEEP_CASES], ids=[c[0] for c in KEEP_CASES]
)
def test_retention(policy, events, expected):
    assert P.simulate(policy, events).kept == expected


@pytest.mark.parametrize(
    "policy, expected",
    [
        (P.keep_best("loss"), 3),
        (P.best_only("loss"), 3),
        (P.combine(P.keep_last(1), P.keep_best("loss", "max")), 2),
        (P.keep_last(2), None),
    ],
)
def test_best_step(policy, expected):
    history = [Saved(s, metrics=m) for s, m in enumerate(losses([2, 1, 9, 0.5, None]))]
    assert policy.best(policy.init(history), history) == expected


# ------------------------------------------------------------ restart equivalence

RESTART_CASES = [
    ("keep_best(2) with every step", P.combine(P.every_n_steps(1), P.keep_best("loss", "min", 2))),
    ("every_n_seconds + keep_last", P.combine(P.every_n_seconds(3600), P.keep_last(2))),
    ("best_only + keep_last(1)", P.combine(P.best_only("loss"), P.keep_last(1))),
    (
        "incremental(3) + keep_last(1)",
        P.combine(P.every_n_steps(2), P.incremental(3), P.keep_last(1)),
    ),
    ("young_daly measured", P.combine(P.young_daly(3600), P.keep_last(1))),
    ("keep_every_n_seconds", P.combine(P.every_n_steps(1), P.keep_every_n_seconds(4000))),
    (
        "everything",
        P.combine(
            P.every_n_steps(3),
            P.every_n_seconds(5000),
            P.best_only("loss"),
            P.incremental(2),
            P.keep_last(2),
            P.keep_best("loss", "min", 1),
            P.keep_every_n_steps(5),
        ),
    ),
]


@pytest.mark.parametrize("policy", [c[1] for c in RESTART_CASES], ids=[c[0] for c in RESTART_CASES])
def test_restarted_run_decides_like_uninterrupted(policy):
    loss_values = [5, 1, 4, 3, 6, 2, 0.5, 7, 0.4, 9, 8, 0.3]
    events = steps(12, dt=1800, metrics=losses(loss_values))
    whole = P.simulate(policy, events, save_seconds=3.0)
    for cut in range(1, len(events)):
        first = P.simulate(policy, events[:cut], save_seconds=3.0)
        # After a crash the run resumes from the newest surviving checkpoint.
        resume_from = max(first.kept) if first.kept else -1
        rest = [e for e in events if e.step > resume_from]
        second = P.simulate(policy, rest, history=first.history, save_seconds=3.0)
        assert [s for s in first.saved if s <= resume_from] + second.saved == whole.saved, cut
        assert second.kept == whole.kept, cut
        assert second.state == whole.state, cut


def test_issue_case_keep_best_restarted_halfway():
    policy = P.combine(P.every_n_steps(1), P.keep_best("loss", "min", 2))
    events = steps(6, metrics=losses([5, 1, 4, 3, 6, 2]))
    first = P.simulate(policy, events[:3])
    assert first.kept == [1, 2]
    second = P.simulate(policy, events[3:], history=first.history)
    assert second.kept == [1, 5]


def test_resume_uses_stored_state_when_retention_deleted_the_best():
    # Folding over survivors alone would forget the best loss (1.0, deleted by keep_last).
    policy = P.combine(P.on_steps([2]), P.best_only("loss"), P.keep_last(1))
    first = P.simulate(policy, steps(3, metrics=losses([1.0, 2.0, 3.0])))
    assert first.saved == [0, 2] and first.kept == [2]
    events = [Event(3, 0.0, {"loss": 1.5}), Event(4, 0.0, {"loss": 0.4})]
    assert P.simulate(policy, events, history=first.history).saved == [4]
    assert P.resume(policy, first.history) == first.state


def test_resume_without_stored_state_folds_history():
    # Checkpoints written by plain jckpt.save carry no policy state.
    history = [Saved(0, created=100.0), Saved(5, created=250.0, metrics={"loss": 1.0})]
    pol = P.combine(P.every_n_seconds(60), P.best_only("loss"))
    state = P.resume(pol, history)
    assert state.inner == (P.EveryNSecondsState(250.0), P.BestOnlyState(1.0))


def test_resume_after_policy_change_falls_back_to_history():
    old = P.combine(P.every_n_steps(1), P.incremental(2))
    first = P.simulate(old, steps(3, dt=10))
    new = P.combine(P.every_n_seconds(25), P.keep_last(1))
    state = P.resume(new, first.history)
    assert state.inner[0] == P.EveryNSecondsState(20.0)
    assert P.simulate(new, steps(6, start=3, dt=10), history=first.history).saved == [5, 8]


def test_state_survives_json_roundtrip():
    policy = RESTART_CASES[-1][1]
    run = P.simulate(policy, steps(7, dt=1800, metrics=losses([5, 1, 4, 3, 6, 2, 1])))
    data = json.loads(json.dumps(P.encode_state(run.state)))
    assert P.decode_state(policy.init(()), data) == run.state


@pytest.mark.parametrize(
    "data",
    [
        {"type": "BestOnlyState", "fields": [1.0]},
        {"type": "CombinedState", "fields": [[]]},
        [1, 2],
        None,
    ],
)
def test_decode_rejects_other_structures(data):
    template = P.combine(P.every_n_seconds(1), P.keep_last(1)).init(())
    with pytest.raises(ValueError, match="policy state"):
        P.decode_state(template, data)


# -------------------------------------------------------------- purity and errors


def test_policies_never_read_the_clock(monkeypatch):
    def no_clock():
        raise AssertionError("a policy read the clock")

    monkeypatch.setattr(time, "time", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    monkeypatch.setattr(time, "perf_counter", no_clock)
    policy = RESTART_CASES[-1][1]
    run = P.simulate(policy, steps(8, dt=1800, metrics=losses([5, 1, 4, 3, 6, 2, 1, 0])))
    assert run.saved


@pytest.mark.parametrize(
    "make",
    [
        lambda: P.every_n_steps(0),
        lambda: P.every_n_steps(1.5),
        lambda: P.every_n_seconds(0),
        lambda: P.best_only("loss", mode="lowest"),
        lambda: P.young_daly(-1),
        lambda: P.young_daly(10, smoothing=0),
        lambda: P.incremental(0),
        lambda: P.keep_last(0),
        lambda: P.keep_every_n_steps(-2),
        lambda: P.keep_best("loss", "min", 0),
        lambda: P.keep_best("loss", "up"),
        lambda: P.keep_every_n_seconds(-1.0),
    ],
)
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_public_names_are_exactly_all():
    # jckpt.policy is a package of modules; its public names are the re-exports in __all__.
    for name in P.__all__:
        assert not inspect.ismodule(getattr(P, name)), name
    public = {n for n, v in vars(P).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public == set(P.__all__)


def test_combine_rejects_non_policies():
    with pytest.raises(TypeError, match="argument 1"):
        P.combine(P.keep_last(1), lambda s: s)


# --------------------------------------------------------------------------- docs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "policies.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOCS.read_text() if DOCS.exists() else "", flags=re.S)


def test_docs_page_exists_and_has_snippets():
    # Without this, a moved or emptied page would silently leave no snippet tests.
    assert DOCS.exists(), f"{DOCS} is missing"
    assert SNIPPETS, f"{DOCS} has no ```python blocks"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_docs_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[index], f"docs/policies.md[{index}]", "exec"), {})
