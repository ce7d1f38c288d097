"""What an operator asks first when runs do not move: is the cluster up, does each of its service actors answer,
what is running and what waits. `ray-finetune status`; it starts nothing."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import ray

# A service actor that takes longer than this to answer a call that does nothing is stuck or overloaded.
ANSWER_WITHIN_S = 5.0

ANSWERING, NOT_STARTED = "answering", "not started"


@dataclass(frozen=True)
class ServiceActor:
    role: str
    state: str                 # ANSWERING, NOT_STARTED (started on demand), or what went wrong
    pid: int | None = None
    node_ip: str | None = None


@dataclass(frozen=True)
class ClusterStatus:
    address: str
    nodes_alive: int
    total: dict[str, float]        # CPU and GPU of the cluster
    available: dict[str, float]    # not taken by actors and tasks now
    actors: list[ServiceActor]
    running: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)   # in the order they will start

    @property
    def healthy(self) -> bool:
        return all(actor.state in (ANSWERING, NOT_STARTED) for actor in self.actors)


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


def cluster_status() -> ClusterStatus:
    """The status of the cluster this process is connected to (cluster.join_if_running first)."""
    from ray_finetune.cluster import NAMESPACE

    probed = {role: _probe(role, name, NAMESPACE) for role, name in _service_actors()}
    running: list[str] = []
    queued: list[str] = []
    scheduler = probed["scheduler"][1]
    if scheduler is not None:
        running, queued = ray.get([scheduler.active_runs.remote(), scheduler.queued.remote()],
                                  timeout=ANSWER_WITHIN_S)
    total, available = ray.cluster_resources(), ray.available_resources()
    return ClusterStatus(
        address=ray.get_runtime_context().gcs_address,
        nodes_alive=sum(1 for node in ray.nodes() if node.get("Alive")),
        total={kind: total.get(kind, 0.0) for kind in ("CPU", "GPU")},
        available={kind: available.get(kind, 0.0) for kind in ("CPU", "GPU")},
        actors=[actor for actor, _ in probed.values()], running=running, queued=queued)
