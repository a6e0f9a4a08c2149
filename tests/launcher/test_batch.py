"""How one batch launch's outcomes are split among its probes (pure: no ranks started)."""

from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.launcher.batch import split


def _done(*names):
    return {n: {"evidence": {"probe": n}, "stage": "last", "duration_s": 1.0} for n in names}


def test_a_finished_batch_gives_every_probe_its_ranks():
    outcomes = [RankOutcome(r, "ok", {"finished": _done("a", "b")}) for r in range(2)]
    parts, casualty = split(["a", "b"], outcomes, 5.0)
    assert casualty is None and [p.probe for p in parts] == ["a", "b"]
    assert all(o.status == "ok" and o.evidence == {"probe": p.probe} for p in parts for o in p.outcomes)


def test_a_crash_is_charged_to_the_probe_it_happened_in_only():
    running = {"probe": "b", "stage": "full_tensor()", "evidence": {"partial": True}}
    outcomes = [
        # rank 0 finished b and was killed by the launcher inside c after its peer died
        RankOutcome(0, "aborted", {"finished": _done("a", "b"), "running": {"probe": "c", "stage": "x"}}),
        RankOutcome(1, "crashed", {"finished": _done("a"), "running": running}, signal="SIGSEGV"),
    ]
    parts, casualty = split(["a", "b", "c"], outcomes, 9.0)
    assert casualty == "b" and [p.probe for p in parts] == ["a", "b"]
    rank0, rank1 = parts[1].outcomes
    assert rank0.status == "ok" and rank0.evidence == {"probe": "b"}
    assert rank1.status == "crashed" and rank1.signal == "SIGSEGV"
    assert rank1.stage == "full_tensor()" and rank1.evidence == {"partial": True}


def test_a_rank_that_never_reached_the_casualty_has_no_evidence_of_it():
    outcomes = [
        RankOutcome(0, "timeout", {"finished": {}, "running": {"probe": "a", "stage": "s", "evidence": {}}}),
        RankOutcome(1, "error", {}, error="RuntimeError: boom"),
    ]
    parts, casualty = split(["a", "b"], outcomes, 3.0)
    assert casualty == "a" and len(parts) == 1
    assert [o.status for o in parts[0].outcomes] == ["timeout", "error"]
    assert parts[0].outcomes[1].evidence == {} and parts[0].outcomes[1].error == "RuntimeError: boom"


def _items(*keys):
    from fsdpqdiag.launcher.batch import Item

    return [Item(key, "task", {}) for key in keys]


def _fake_launches(script):
    """An ``execute`` that ends each launch as ``script`` says: the keys every rank
    finishes, then (optionally) the key rank 1 dies in."""
    launched: list[list[str]] = []

    def execute(task, watch=None):
        keys = [item["key"] for item in task.extra["batch"]]
        launched.append(keys)
        finishes, dies_in = script[len(launched) - 1]
        done = _done(*[k for k in keys if k in finishes])
        if dies_in is None:
            return [RankOutcome(r, "ok", {"finished": done}) for r in range(2)]
        running = {"probe": dies_in, "stage": "s", "evidence": {}}
        return [
            RankOutcome(0, "aborted", {"finished": done, "running": running}),
            RankOutcome(1, "crashed", {"finished": done, "running": running}, signal="SIGSEGV"),
        ]

    return execute, launched


def test_a_casualty_is_charged_and_the_next_launch_starts_after_it():
    from fsdpqdiag.core.config import RunConfig
    from fsdpqdiag.launcher.batch import run_resilient

    execute, launched = _fake_launches([({"a"}, "b"), ({"c", "d"}, None)])
    settled = []
    run_resilient(
        _items("a", "b", "c", "d"),
        RunConfig(world_size=2, device="cpu"),
        execute,
        lambda parts: settled.extend(parts) or [],
    )
    assert launched == [["a", "b", "c", "d"], ["c", "d"]]
    assert [p.probe for p in settled] == ["a", "b", "c", "d"]
    assert [o.status for o in settled[1].outcomes] == ["aborted", "crashed"]


def test_settle_drops_items_that_need_not_run_and_isolate_launches_one_each():
    from fsdpqdiag.core.config import RunConfig
    from fsdpqdiag.launcher.batch import run_resilient

    execute, launched = _fake_launches([({"a"}, None), ({"c"}, None)])
    run_resilient(
        _items("a", "b", "c"),
        RunConfig(world_size=2, device="cpu"),
        execute,
        lambda parts: ["b"],
        isolate=True,
    )
    assert launched == [["a"], ["c"]]


def test_rank_0_alone_decides_where_its_row_is_the_record():
    outcomes = [
        RankOutcome(0, "aborted", {"finished": _done("a"), "running": {"probe": "b", "stage": "x"}}),
        RankOutcome(
            1, "crashed", {"finished": {}, "running": {"probe": "a", "stage": "y"}}, signal="SIGSEGV"
        ),
    ]
    parts, casualty = split(["a", "b"], outcomes, 4.0, lead_rank_decides={"a", "b"})
    assert casualty == "b" and [p.probe for p in parts] == ["a", "b"]
    assert parts[0].outcomes[0].status == "ok" and parts[0].outcomes[1].status == "crashed"
    # an item outside the set (the preflight that leads a sweep's launch) needs every rank
    parts, casualty = split(["a", "b"], outcomes, 4.0, lead_rank_decides={"b"})
    assert casualty == "a" and [p.probe for p in parts] == ["a"]


def _cells(*names):
    from fsdpqdiag.analyses.matrix import Cell

    return [Cell(name) for name in names]


def test_a_sweep_led_by_the_preflight_runs_it_in_the_cells_launch():
    from fsdpqdiag.analyses.matrix.sweep import sweep
    from fsdpqdiag.core.config import RunConfig
    from fsdpqdiag.launcher.batch import Item

    run = RunConfig(world_size=2, device="cpu")
    execute, launched = _fake_launches([({"preflight", "A", "C"}, None)])
    led: list[str] = []
    lead = (Item("preflight", "preflight", {}), lambda part: led.append(part.probe) or False)
    rows = sweep(_cells("A", "C"), run, {}, execute, lead=lead)
    assert launched == [["preflight", "A", "C"]] and led == ["preflight"]
    assert rows == {"A": {"probe": "A"}, "C": {"probe": "C"}}

    # The launch dies inside the preflight: the cells run in a fresh launch.
    execute, launched = _fake_launches([(set(), "preflight"), ({"A", "C"}, None)])
    rows = sweep(_cells("A", "C"), run, {}, execute, lead=(lead[0], lambda part: False))
    assert launched == [["preflight", "A", "C"], ["A", "C"]] and set(rows) == {"A", "C"}

    # One launch per cell: the preflight still leads the first cell's.
    execute, launched = _fake_launches([({"preflight", "A"}, None), ({"C"}, None)])
    rows = sweep(_cells("A", "C"), run, {}, execute, isolate=True, lead=(lead[0], lambda part: False))
    assert launched == [["preflight", "A"], ["C"]] and set(rows) == {"A", "C"}


def test_a_preflight_that_refuses_the_cells_stops_the_ones_not_yet_run():
    from fsdpqdiag.analyses.matrix.sweep import sweep
    from fsdpqdiag.core.config import RunConfig
    from fsdpqdiag.launcher.batch import Item

    # The preflight and A finish, C kills the launch: E is not relaunched.
    execute, launched = _fake_launches([({"preflight", "A"}, "C")])
    lead = (Item("preflight", "preflight", {}), lambda part: True)
    rows = sweep(_cells("A", "C", "E"), RunConfig(world_size=2, device="cpu"), {}, execute, lead=lead)
    assert launched == [["preflight", "A", "C", "E"]]
    assert rows["A"] == {"probe": "A"} and rows["C"]["status"] == "crashed" and "E" not in rows


def test_a_cells_casualty_row_is_the_rank_that_died_not_the_one_killed_after_it():
    from fsdpqdiag.analyses.matrix.sweep import casualty_row

    running = {"probe": "D", "stage": "forward", "evidence": {}}
    outcomes = [
        RankOutcome(0, "aborted", {"running": running}, error="killed: a peer rank ended first"),
        RankOutcome(1, "crashed", {"running": running}, signal="SIGSEGV"),
    ]
    row = casualty_row(outcomes)
    assert row["status"] == "crashed" and row["signal"] == "SIGSEGV"
    raised = [
        RankOutcome(0, "error", {}, error="RuntimeError: second", failed_at=2.0),
        RankOutcome(1, "error", {}, error="RuntimeError: first", failed_at=1.0),
    ]
    assert casualty_row(raised) == {"status": "error", "signal": None, "error": "RuntimeError: first"}
