"""The facade: call-for-call the Databricks Foundation Model Fine-tuning API (SPEC §1).

Every function validates in the driver, then talks to the actors through Ray handles: the scheduler for
changes, the event store for reads (replayed into runs, never read from a status column).
"""
from __future__ import annotations

import builtins
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import ray

from actors.event_sink import event_store
from eventstore.schema import USER_FACING_TYPES, EventType
from ray_finetune import cluster, settings as settings_module, spec as spec_module
from ray_finetune.entities import (
    EventList, Model, ModelList, RunList, RunStatus, TrainingEvent, TrainingRun,
)
from ray_finetune.errors import ConfigError, RayFinetuneError, RunNotFoundError, ValidationError

RunRef = "str | TrainingRun"


def _answer(reference: Any) -> Any:
    """The scheduler's answer; an error of ours it raised arrives as itself, its message one line, not wrapped in
    Ray's remote traceback."""
    try:
        return ray.get(reference)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, RayFinetuneError):
            raise error.cause from None
        raise


def create(
    model: str,
    train_data_path: str,
    register_to: str,
    *,
    experiment_path: str | None = "",
    task_type: str = "CHAT_COMPLETION",
    eval_data_path: str | None = None,
    eval_prompts: builtins.list[str] | None = None,
    custom_weights_path: str | None = None,
    training_duration: str | None = None,
    learning_rate: float | str | None = None,
    context_length: int | None = None,
    validate_inputs: bool = True,
    data_prep_cluster_id: str | None = None,
    checkpoint_interval: str | None = None,
    checkpoints_to_keep: int | None = None,
) -> TrainingRun:
    """Validate everything, queue the run, and return at once (status PENDING).

    Beyond the original API: `checkpoint_interval` ('1ep' by default, or e.g. '50ba') and `checkpoints_to_keep`
    (the newest N are kept, 3 by default; the final checkpoint, the newest, always is)."""
    spec = spec_module.resolve(**locals())   # exactly create()'s arguments, by name
    config = cluster.connect()
    from actors import scheduler

    handle = scheduler.get_or_create()
    _refuse_settings_the_cluster_ignores(config, handle)
    state = _answer(handle.submit.remote(spec))
    run = TrainingRun.from_state(state)
    run.status = RunStatus.PENDING  # the contract: create() answers PENDING, whatever has happened since
    return run


def _refuse_settings_the_cluster_ignores(here: settings_module.Settings, scheduler: Any) -> None:
    try:
        clusters = _answer(scheduler.settings_used.remote())
    except AttributeError:   # a scheduler of an older ray_finetune (a head started before an upgrade): not checked
        return
    ignored = settings_module.set_here_but_not_used(here, clusters)
    if ignored:
        shown = settings_module.without_password
        listed = "; ".join(f"{key}={shown(mine)} here, {shown(theirs) or '(unset)'} on the cluster"
                           for key, mine, theirs in ignored)
        raise ConfigError(f"the cluster's runs use the settings it was started with, not this process's: {listed}. "
                          "Unset them here to queue the run with the cluster's; or, to use these, stop the cluster "
                          "(the local head: `ray-finetune down`, which stops the runs on it too) and create again: a "
                          "new local head starts with this process's settings")


def estimate(
    model: str,
    train_data_path: str,
    register_to: str | None = None,
    *,
    experiment_path: str | None = "",
    task_type: str = "CHAT_COMPLETION",
    eval_data_path: str | None = None,
    eval_prompts: builtins.list[str] | None = None,
    custom_weights_path: str | None = None,
    training_duration: str | None = None,
    learning_rate: float | str | None = None,
    context_length: int | None = None,
    validate_inputs: bool = True,
    data_prep_cluster_id: str | None = None,
    checkpoint_interval: str | None = None,
    checkpoints_to_keep: int | None = None,
    probe: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Any:
    """A dry run with create()'s arguments: validates, tokenizes and packs the data, and returns token counts,
    packing efficiency, steps and an estimated training time from a short measured probe. Queues nothing.
    `progress`, when given, is called with a line of text as the work goes on (shards tokenized; the probe)."""
    from ray_finetune.estimate import estimate as dry_run

    arguments = {k: v for k, v in locals().items() if k not in ("probe", "progress", "dry_run")}
    spec = spec_module.resolve(**{**arguments, "register_to": register_to or "estimate.only"})
    return dry_run(spec, probe=probe, progress=progress)


def _name(training_run: "str | TrainingRun") -> str:
    if isinstance(training_run, TrainingRun):
        return training_run.name
    if isinstance(training_run, str) and training_run:
        return training_run
    raise ValidationError("training_run", f"{training_run!r} is not a run", expected="a run name or a TrainingRun")


def get(training_run: "str | TrainingRun") -> TrainingRun:
    name = _name(training_run)
    cluster.connect()
    store = event_store()
    state = ray.get(store.run_state.remote(name))
    if state is None or state.deleted:
        raise RunNotFoundError(f"Finetuning run {name} not found")
    events = ray.get(store.events.remote(run_name=name, types=sorted(USER_FACING_TYPES)))
    return TrainingRun.from_state(state, events)


def list(
    training_runs: builtins.list["str | TrainingRun"] | None = None,
    experiment_id: str | None = None,
    *,
    statuses: builtins.list["str | RunStatus"] | None = None,
    user_emails: builtins.list[str] | None = None,
    before: datetime | str | None = None,
    after: datetime | str | None = None,
    include_details: bool = True,
    limit: int = 100,
) -> RunList:
    """Runs newest first; `limit` per page, `next_page()` for more."""
    cluster.connect()
    states = [s for s in ray.get(event_store().run_states.remote()) if not s.deleted]
    names = {_name(r) for r in training_runs} if training_runs else None
    wanted_statuses = {RunStatus(s).value if not isinstance(s, RunStatus) else s.value for s in statuses or []}
    before_time, after_time = _as_time("before", before), _as_time("after", after)
    selected = [
        s for s in reversed(states)
        if (names is None or s.name in names)
        and (experiment_id is None or s.experiment_id == experiment_id)
        and (not wanted_statuses or s.status in wanted_statuses)
        and (not user_emails or s.spec.get("created_by") in user_emails)
        and (before_time is None or (s.created_at and s.created_at < before_time))
        and (after_time is None or (s.created_at and s.created_at > after_time))
    ]
    runs = [TrainingRun.from_state(s) for s in selected]
    if not include_details:
        for run in runs:
            run.details = None
    return _page(runs, limit)


def _page(runs: builtins.list[TrainingRun], limit: int) -> RunList:
    if limit <= 0 or len(runs) <= limit:
        return RunList(runs)
    return RunList(runs[:limit], next_page=lambda: _page(runs[limit:], limit))


def _as_time(parameter: str, value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(parameter, f"{value!r} is not a time", expected="a datetime or ISO 8601 text") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def cancel(runs: builtins.list["str | TrainingRun"] | "str | TrainingRun | None" = None,
           experiment_id: str | None = None, *, save_checkpoint: bool = False) -> int:
    """Stop runs (by name, or every run of an experiment); returns how many were stopped. A running run stops at
    the next step boundary; with save_checkpoint=True it writes a final checkpoint first."""
    if (runs is None) == (experiment_id is None):
        raise ValidationError("runs", "give exactly one of runs and experiment_id",
                              expected="cancel(runs=[...]) or cancel(experiment_id='...')")
    cluster.connect()
    if experiment_id is not None:
        names = [s.name for s in ray.get(event_store().run_states.remote())
                 if s.experiment_id == experiment_id and not s.is_terminal]
    else:
        items = runs if isinstance(runs, builtins.list) else [runs]
        names = [_name(r) for r in items]
        for name in names:
            get(name)  # unknown names are an error, as in the original
    from actors import scheduler

    return len(_answer(scheduler.get_or_create().cancel.remote(names, save_checkpoint)))


def resume(training_run: "str | TrainingRun") -> TrainingRun:
    """Queue a STOPPED or FAILED run again (ours; the original cannot): it continues from its newest complete
    checkpoint exactly as if it had never stopped -- same weights, optimizer state, learning-rate schedule, data
    order and random state, same name, MLflow run and events -- and then registers its model as usual. Returns the
    run (QUEUED); follow it with get_events(follow=True) or wait()."""
    name = _name(training_run)
    get(name)   # unknown names are an error
    from actors import scheduler

    refused = _answer(scheduler.get_or_create().resume.remote(name, spec_module.current_user()))
    if refused:
        raise ValidationError("training_run", f"run {name} cannot be resumed: {refused}",
                              expected="a STOPPED or FAILED run that saved a checkpoint")
    return get(name)


def delete(runs: builtins.list["str | TrainingRun"] | "str | TrainingRun") -> int:
    """Forget finished runs (their events stay in the log, marked DELETED); running ones are canceled first."""
    items = runs if isinstance(runs, builtins.list) else [runs]
    names = [_name(r) for r in items]
    runs_now = [get(name) for name in names]
    active = [r.name for r in runs_now if not r.status.is_terminal()]
    if active:
        cancel(active)
    from eventstore.schema import NewEvent

    ray.get(event_store().append.remote([
        NewEvent(run_name=name, type=EventType.DELETED, actor="driver", message="deleted") for name in names
    ]))
    return len(names)


def follow_events(training_run: "str | TrainingRun", *, timeout: float | None = None, poll_s: float = 1.0,
                  since_resumed: bool = False) -> Iterator[TrainingEvent]:
    """Yield user-facing events as they are appended, until the run is terminal. `since_resumed`: begin at the
    run's latest RESUMED event, leaving out the life it resumed from (what `ray-finetune runs resume --wait` shows)."""
    name = _name(training_run)
    get(name)
    store = event_store()
    deadline = None if timeout is None else time.monotonic() + timeout
    last_seq = 0
    if since_resumed:
        resumed = ray.get(store.events.remote(run_name=name, types=["RESUMED"]))
        last_seq = resumed[-1].seq - 1 if resumed else 0
    while True:
        batch = ray.get(store.events.remote(run_name=name, after_seq=last_seq))
        for event in batch:
            last_seq = event.seq
            if event.type in USER_FACING_TYPES:
                yield TrainingEvent.from_event(event)
        state = ray.get(store.run_state.remote(name))
        if state.is_terminal and not ray.get(store.events.remote(run_name=name, after_seq=last_seq)):
            return
        if deadline is not None and time.monotonic() > deadline:
            recent = ray.get(store.events.remote(run_name=name))[-5:]
            raise TimeoutError(f"run {name} is still {state.status} after {timeout} s; its last events: "
                               + "; ".join(f"{e.type} ({e.message})" for e in recent))
        time.sleep(poll_s)


def get_events(training_run: "str | TrainingRun", follow: bool = False) -> "EventList | Iterator[TrainingEvent]":
    """User-facing events, oldest first; with follow=True, an iterator that streams them until the run ends."""
    if follow:
        return follow_events(training_run)
    name = _name(training_run)
    get(name)
    events = ray.get(event_store().events.remote(run_name=name, types=sorted(USER_FACING_TYPES)))
    return EventList(TrainingEvent.from_event(e) for e in events)


def get_checkpoints(training_run: "str | TrainingRun") -> builtins.list[str]:
    """Paths of the run's checkpoints (.../checkpoints/ep{E}-ba{B}), oldest first."""
    name = _name(training_run)
    cluster.connect()
    state = ray.get(event_store().run_state.remote(name))
    if state is None or state.deleted:
        raise RunNotFoundError(f"Finetuning run {name} not found")
    return [c.path for c in state.checkpoints]


def get_models() -> ModelList:
    """Models that resolve on this machine without a network: the offline packages installed, and the causal
    language models in the local Hugging Face cache. Any of their names can be given to create() as `model`."""
    from ray_finetune.train.models import available_models

    return ModelList(Model(name=model_id, display_name=model_id.split("/")[-1], max_context_length=context)
                     for model_id, context in available_models().items())
