"""What an operator asks first when runs do not move: is the cluster up, does each of its service actors answer,
does every node reach the storage the head writes, does the head reach the MLflow tracking store, what is running
and what waits. `ray-finetune status`; it starts nothing (it writes the storage's identity file if no run has yet,
and each node writes and removes a probe file: see storage.identity and storage.unreached)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray

# A service actor that takes longer than this to answer a call that does nothing is stuck or overloaded.
ANSWER_WITHIN_S = 5.0
# A node that has not read one small file of the storage within this is as good as not reaching it (a hung mount);
# the first task on a node also starts a Ray worker process there.
READ_STORAGE_WITHIN_S = 30.0

ANSWERING, NOT_STARTED = "answering", "not started"
REACHES, NOT_CHECKED = "reaches", "not checked"
OLDER_SCHEDULER = "the scheduler runs an older ray_finetune (restart the head to check)"   # it lacks the call


@dataclass(frozen=True)
class ServiceActor:
    role: str
    state: str                 # ANSWERING, NOT_STARTED (started on demand), or what went wrong
    pid: int | None = None
    node_ip: str | None = None


@dataclass(frozen=True)
class ActiveRun:
    name: str
    status: str                # STARTING, RUNNING or TERMINATING
    last_event: str            # the newest event's type, and how long ago it came: a stalled run stands out
    last_event_s_ago: float


@dataclass(frozen=True)
class NodeStorage:
    node_ip: str
    node_id: str
    state: str                 # REACHES, or why the node does not reach the head's storage


@dataclass(frozen=True)
class ClusterStatus:
    address: str
    nodes_alive: int
    storage: str                   # RAY_FINETUNE_STORAGE as the scheduler uses it ("" when it did not answer)
    nodes: list[NodeStorage]       # each alive node: does it reach that storage
    total: dict[str, float]        # CPU and GPU of the cluster
    available: dict[str, float]    # not taken by actors and tasks now
    actors: list[ServiceActor]
    running: list[ActiveRun] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)   # in the order they will start
    tracking_store: str = ""       # MLFLOW_TRACKING_URI as the scheduler uses it, its password hidden
    tracking_state: str = ""       # REACHES, "not checked: ...", or why the head does not reach it

    @property
    def healthy(self) -> bool:
        return (all(actor.state in (ANSWERING, NOT_STARTED) for actor in self.actors)
                and all(node.state == REACHES for node in self.nodes)
                and (self.tracking_state == REACHES or self.tracking_state.startswith(NOT_CHECKED)))


def _service_actors() -> list[tuple[str, str]]:
    """(role, name) of the actors the cluster has one of; imported here, not at the top: `status` must stay light."""
    from actors import data_packer, evaluator, registrar, scheduler
    from eventstore import actor as event_store

    return [("scheduler", scheduler.ACTOR_NAME), ("event store", event_store.ACTOR_NAME),
            ("data packer", data_packer.ACTOR_NAME), ("evaluator", evaluator.ACTOR_NAME),
            ("registrar", registrar.ACTOR_NAME)]


def _whereabouts(_actor: Any) -> tuple[int, str]:
    return os.getpid(), ray.util.get_node_ip_address()


def _probe(role: str, name: str, namespace: str) -> tuple[ServiceActor, Any]:
    """The actor's state, and its handle when it answers."""
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:   # Ray: no live actor of that name
        return ServiceActor(role, NOT_STARTED), None
    try:
        pid, node_ip = ray.get(handle.__ray_call__.remote(_whereabouts), timeout=ANSWER_WITHIN_S)
    except ray.exceptions.GetTimeoutError:
        return ServiceActor(role, f"not answering within {ANSWER_WITHIN_S:g} s"), None
    except ray.exceptions.RayActorError as error:
        return ServiceActor(role, f"dead or restarting: {str(error).strip().splitlines()[0]}"), None
    return ServiceActor(role, ANSWERING, pid, node_ip), handle


def _active_runs(names: list[str], store: Any) -> list[ActiveRun]:
    if not names:
        return []
    quoted = ", ".join("'" + name.replace("'", "''") + "'" for name in names)
    _, rows = ray.get(store.sql.remote(
        f"SELECT e.run_name, r.status, arg_max(e.type, e.seq), max(e.time) FROM events e JOIN runs r "
        f"ON e.run_name = r.run_name WHERE e.run_name IN ({quoted}) GROUP BY e.run_name, r.status"),
        timeout=ANSWER_WITHIN_S)
    now = datetime.now(timezone.utc).replace(tzinfo=None)   # the log's times are UTC without a zone
    found = {name: ActiveRun(name, status, kind, round((now - time).total_seconds(), 1))
             for name, status, kind, time in rows}
    return [found[name] for name in names if name in found]


def _nodes_storage(scheduler: Any) -> tuple[str, list[NodeStorage]]:
    """RAY_FINETUNE_STORAGE, and whether each alive node reads the identity the head wrote into it and writes there
    (as a run's trainers are checked before they train)."""
    from ray_finetune import storage
    from ray_finetune.cluster import on_every_node
    from ray_finetune.errors import ConfigError

    try:
        location, identity = ray.get(scheduler.storage.remote(), timeout=READ_STORAGE_WITHIN_S)
    except (ray.exceptions.RayError, AttributeError) as error:
        # the head itself does not reach the storage (ConfigError says why), the scheduler is too busy or gone, or
        # it runs the code of an older ray_finetune that has no such call
        why = f"the scheduler did not answer ({type(error).__name__})"
        if isinstance(getattr(error, "cause", None), ConfigError):
            why = str(error.cause)  # type: ignore[union-attr]
        elif isinstance(error, AttributeError):
            why = OLDER_SCHEDULER
        return "", [NodeStorage(node["NodeManagerAddress"], node["NodeID"], f"{NOT_CHECKED}: {why}")
                    for node in ray.nodes() if node.get("Alive")]
    return location, [NodeStorage(answer.address, answer.node_id, answer.failure or answer.value or REACHES)
                      for answer in on_every_node(storage.unreached, location, identity,
                                                  within_s=READ_STORAGE_WITHIN_S)]


def _tracking_store(scheduler: Any) -> tuple[str, str]:
    """MLFLOW_TRACKING_URI, and whether the head (which creates each run's MLflow run) reaches it."""
    from ray_finetune import tracking

    try:
        where, problem = ray.get(scheduler.tracking_store.remote(),
                                 timeout=ANSWER_WITHIN_S + tracking.REACH_TIMEOUT_S)
    except (ray.exceptions.RayError, AttributeError) as error:
        why = (OLDER_SCHEDULER if isinstance(error, AttributeError)
               else f"the scheduler did not answer ({type(error).__name__})")
        return "", f"{NOT_CHECKED}: {why}"
    return where, problem or REACHES


def cluster_status() -> ClusterStatus:
    """The status of the cluster this process is connected to (cluster.join_if_running first)."""
    from ray_finetune.cluster import NAMESPACE

    probed = {role: _probe(role, name, NAMESPACE) for role, name in _service_actors()}
    running: list[ActiveRun] = []
    queued: list[str] = []
    scheduler, store = probed["scheduler"][1], probed["event store"][1]
    try:   # an actor that answered a moment ago may still be too busy now: then the lists stay empty
        if scheduler is not None:
            active, queued = ray.get([scheduler.active_runs.remote(), scheduler.queued.remote()],
                                     timeout=ANSWER_WITHIN_S)
            if store is not None:
                running = _active_runs(active, store)
    except ray.exceptions.GetTimeoutError:
        pass
    location, nodes = _nodes_storage(scheduler) if scheduler is not None else ("", [])
    tracking_store, tracking_state = (_tracking_store(scheduler) if scheduler is not None else
                                      ("", f"{NOT_CHECKED}: the scheduler is not running"))
    total, available = ray.cluster_resources(), ray.available_resources()
    return ClusterStatus(
        address=ray.get_runtime_context().gcs_address,
        nodes_alive=sum(1 for node in ray.nodes() if node.get("Alive")), storage=location, nodes=nodes,
        total={kind: total.get(kind, 0.0) for kind in ("CPU", "GPU")},
        available={kind: available.get(kind, 0.0) for kind in ("CPU", "GPU")},
        actors=[actor for actor, _ in probed.values()], running=running, queued=queued,
        tracking_store=tracking_store, tracking_state=tracking_state)
