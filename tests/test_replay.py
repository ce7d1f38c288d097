"""Replay properties: whatever order the actors' events interleave in, the derived state is valid, and the SQL
`runs` view derives the same status and details as the Python fold."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore.replay import replay
from eventstore.schema import TERMINAL_STATUSES, EventType, NewEvent
from eventstore.store import EventStore

E = EventType
HAPPY_PATH = [E.CREATED, E.QUEUED, E.STARTED, E.DATA_VALIDATED, E.PLACED, E.MODEL_INITIALIZED, E.TRAIN_STARTED,
              E.TRAIN_UPDATED, E.CHECKPOINT_SAVED, E.EVALUATED, E.TRAIN_UPDATED, E.CHECKPOINT_SAVED, E.EVALUATED,
              E.TRAIN_FINISHED, E.REGISTERED, E.COMPLETED]
EXPECTED_STATUS_AFTER = {E.CREATED: "PENDING", E.QUEUED: "QUEUED", E.STARTED: "STARTING", E.TRAIN_STARTED: "RUNNING",
                         E.TRAIN_FINISHED: "TERMINATING", E.COMPLETED: "COMPLETED"}
# Late events an actor may still append after the scheduler ended a run (e.g. a step report racing a cancel).
STRAY = [E.TRAIN_UPDATED, E.EVALUATED, E.CHECKPOINT_SAVED]


@st.composite
def run_history(draw, name: str) -> tuple[list[EventType], str]:
    """One run's events as the actors can produce them, and the status it must end in."""
    outcome = draw(st.sampled_from(["complete", "fail", "cancel", "in_flight", "requeue_then_complete",
                                    "stop_resume_complete", "fail_resume_fail", "stop_resume_queued"]))
    cut = draw(st.integers(min_value=2, max_value=len(HAPPY_PATH) - 1))
    stopped = HAPPY_PATH[:cut] + [E.CANCEL_REQUESTED, E.CANCELED] + draw(st.lists(st.sampled_from(STRAY), max_size=2))
    if outcome == "stop_resume_complete":     # a resumed run begins a new life: terminal no longer
        events, status = stopped + [E.RESUMED] + HAPPY_PATH[2:], "COMPLETED"
    elif outcome == "stop_resume_queued":
        events, status = stopped + [E.RESUMED], "QUEUED"
    elif outcome == "fail_resume_fail":
        events = HAPPY_PATH[:cut] + [E.FAILED_EXCEPTION, E.FAILED, E.RESUMED, E.STARTED, E.FAILED_EXCEPTION, E.FAILED]
        status = "FAILED"
    elif outcome == "complete":
        events, status = list(HAPPY_PATH), "COMPLETED"
    elif outcome == "requeue_then_complete":
        events, status = HAPPY_PATH[:cut] + [E.REQUEUED] + HAPPY_PATH[2:], "COMPLETED"
    elif outcome == "fail":
        events, status = HAPPY_PATH[:cut] + [E.FAILED_EXCEPTION, E.FAILED], "FAILED"
    elif outcome == "cancel":
        events, status = HAPPY_PATH[:cut] + [E.CANCEL_REQUESTED, E.CANCELED], "STOPPED"
    else:
        events = HAPPY_PATH[:cut]
        status = next(EXPECTED_STATUS_AFTER[e] for e in reversed(events) if e in EXPECTED_STATUS_AFTER)
    if outcome in ("fail", "cancel", "complete") and draw(st.booleans()):
        events += draw(st.lists(st.sampled_from(STRAY), max_size=3))
    return events, status


@st.composite
def interleaved_log(draw):
    histories = [draw(run_history(f"run-{i}")) for i in range(draw(st.integers(1, 4)))]
    queues = [list(h[0]) for h in histories]
    order = []
    while any(queues):
        index = draw(st.sampled_from([i for i, q in enumerate(queues) if q]))
        order.append((f"run-{index}", queues[index].pop(0)))
    return order, {f"run-{i}": h[1] for i, h in enumerate(histories)}


@settings(max_examples=60, deadline=None)
@given(interleaved_log())
def test_any_interleaving_gives_a_valid_state_and_sql_agrees(tmp_path_factory, log):
    order, expected = log
    store = EventStore(":memory:")
    store.append(NewEvent(run_name=run, type=kind, actor="test", message=f"{kind.value} of {run}",
                          payload={"path": f"/c/{i}", "epoch": 1, "step": i, "spec": {"model": "m"}})
                 for i, (run, kind) in enumerate(order))
    events = store.events()
    states = replay(events)
    assert {name: s.status for name, s in states.items()} == expected
    for name, state in states.items():
        own = [e for e in events if e.run_name == name]
        assert len(state.checkpoints) == sum(e.type == "CHECKPOINT_SAVED" for e in own)
        assert (state.completed_at is not None) == (state.status in TERMINAL_STATUSES)
        if state.status == "FAILED":
            assert state.details == f"FAILED_EXCEPTION of {name}"
        if state.status == "STOPPED":
            assert state.details == f"CANCELED of {name}"
        if state.status == "QUEUED":
            assert state.details is None and state.attempts == 0
        if state.status in TERMINAL_STATUSES:
            resumed = max([i for i, e in enumerate(own) if e.type == "RESUMED"], default=0)
            first_terminal = next(e for e in own[resumed:] if e.type in ("COMPLETED", "FAILED", "CANCELED"))
            assert state.completed_at == first_terminal.time
    _, rows = store.sql("SELECT run_name, status, details FROM runs ORDER BY run_name")
    assert rows == sorted((name, s.status, s.details) for name, s in states.items())
