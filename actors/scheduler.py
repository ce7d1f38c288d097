"""The scheduler actor (one per cluster, detached, named): accepts runs, keeps the queue, and drives each run
through its chain of actor messages:

    CREATED → QUEUED → STARTED → data packer (DATA_VALIDATED) → evaluator baseline → trainer group
    (MODEL_INITIALIZED, TRAIN_STARTED, TRAIN_UPDATED…, CHECKPOINT_SAVED + evaluator per checkpoint)
    → TRAIN_FINISHED → registrar (REGISTERED) → COMPLETED
    any failure → FAILED_EXCEPTION (the reason) → FAILED;  cancel → CANCELED

The queue is not stored: after a restart it is rebuilt by replaying the log.
"""
from __future__ import annotations

import asyncio
import random
import re
import string
import traceback
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from actors.data_packer import DataPacker
from actors.evaluator import Evaluator
from actors.event_sink import NAMESPACE, EventSink, event_store
from actors.messages import EvaluateRequest, PackRequest, RegisterRequest, RunContext, TrainRequest
from actors.registrar import Registrar
from actors.trainer_group import TrainerGroup
from eventstore.replay import RunState
from eventstore.schema import PENDING, QUEUED, EventType
from ray_finetune import settings, tracking
from ray_finetune.spec import RunSpec
from ray_finetune.train.checkpoint import weights_folder
from ray_finetune.train.plan import make_plan

ACTOR_NAME = "ray_finetune_scheduler"


def run_name_for(model: str, taken: set[str]) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-")[:32] or "run"
    while True:
        name = f"{stem}-{''.join(random.choices(string.ascii_lowercase, k=6))}"
        if name not in taken:
            return name


def failure_reason(error: BaseException) -> str:
    """One line an operator can act on."""
    if isinstance(error, (ActorDiedError, RayActorError)) and not isinstance(error, RayTaskError):
        return f"a worker of this run died unexpectedly (its process was killed or crashed): {str(error).splitlines()[0]}"
    if isinstance(error, RayTaskError):
        cause = error.cause if error.cause is not None else error
        if isinstance(cause, (ActorDiedError, RayActorError)):
            return failure_reason(cause)
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    return f"{type(error).__name__}: {error}"


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)
class Scheduler:
    def __init__(self) -> None:
        self.settings = settings.load()
        self.store = event_store()
        self.queue: list[str] = []
        self.specs: dict[str, RunContext] = {}
        self.active: dict[str, asyncio.Task] = {}
        self.names: set[str] = set()
        self._recovered = False

    async def _recover(self) -> None:
        """Rebuild the queue from the log; runs that were mid-flight when the scheduler died end FAILED."""
        if self._recovered:
            return
        self._recovered = True
        for state in await self.store.run_states.remote():
            self.names.add(state.name)
            if state.is_terminal or state.deleted:
                continue
            context = RunContext(run_name=state.name, spec=RunSpec(**state.spec), mlflow_run_id=state.run_id or "",
                                 save_folder=state.save_folder or "")
            self.specs[state.name] = context
            if state.status in (PENDING, QUEUED):
                self.queue.append(state.name)
            else:
                await self._fail(state.name, "the run was interrupted (the scheduler or the head node restarted) "
                                 "and automatic resume is not available yet", None)
        self._dispatch()

    async def submit(self, spec: RunSpec) -> RunState:
        await self._recover()
        name = run_name_for(spec.model, self.names)
        self.names.add(name)
        experiment = tracking.experiment_path_for(spec.created_by, name, spec.experiment_path)
        tracked = await asyncio.to_thread(tracking.start_run, self.settings, experiment_path=experiment,
                                          run_name=name, params=spec.model_dump())
        sink = EventSink("scheduler", name)
        await sink.emit_async(EventType.CREATED, f"run created by {spec.created_by}", {
            "spec": spec.model_dump(), "experiment_id": tracked.experiment_id, "run_id": tracked.run_id,
            "save_folder": tracked.save_folder, "experiment_path": experiment,
        })
        await sink.emit_async(EventType.QUEUED, f"queued behind {len(self.queue) + len(self.active)} run(s)",
                              {"position": len(self.queue)})
        self.specs[name] = RunContext(run_name=name, spec=spec, mlflow_run_id=tracked.run_id,
                                      save_folder=tracked.save_folder)
        self.queue.append(name)
        self._dispatch()
        return await self.store.run_state.remote(name)

    async def cancel(self, names: list[str]) -> list[str]:
        """Stop each named run that is not finished; returns the names actually stopped."""
        await self._recover()
        stopped = []
        for name in names:
            if name in self.queue:
                self.queue.remove(name)
                await EventSink("scheduler", name).emit_async(EventType.CANCELED, "canceled before it started")
                await asyncio.to_thread(tracking.end_run, self.settings, self.specs[name].mlflow_run_id, "KILLED")
                stopped.append(name)
            elif name in self.active:
                await EventSink("scheduler", name).emit_async(EventType.CANCEL_REQUESTED, "cancel requested")
                task = self.active[name]
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                stopped.append(name)
        return stopped

    async def active_runs(self) -> list[str]:
        return list(self.active)

    def _dispatch(self) -> None:
        while self.queue and len(self.active) < self.settings.max_concurrent_runs:
            name = self.queue.pop(0)
            self.active[name] = asyncio.get_running_loop().create_task(self._supervise(name))

    async def _supervise(self, name: str) -> None:
        context = self.specs[name]
        sink = EventSink("scheduler", name)
        actors: list[Any] = []
        group: TrainerGroup | None = None
        try:
            await sink.emit_async(EventType.STARTED, "starting the run's actors")
            packer = DataPacker.remote()
            actors.append(packer)
            data = await packer.pack.remote(PackRequest(run=context))
            ray.kill(packer)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            world = self.settings.trainer_workers if not gpus else min(gpus, max(1, self.settings.trainer_workers))
            plan = make_plan(rows=int(data.train_stats["rows"]), tokens=int(data.train_stats["tokens"]),
                             duration=context.spec.duration, world_size=world, seed=context.spec.seed)
            evaluator = Evaluator.remote()
            actors.append(evaluator)
            init_weights = (str(weights_folder("custom_weights_path", context.spec.custom_weights_path))
                            if context.spec.custom_weights_path else None)
            if data.eval_rows_path or context.spec.eval_prompts:
                await evaluator.evaluate.remote(EvaluateRequest(
                    run=context, weights_path=init_weights or context.spec.model_path, step=0, epoch=0,
                    eval_rows_path=data.eval_rows_path))
            group = TrainerGroup(world, gpus_per_worker=1 if gpus else 0)
            await sink.emit_async(EventType.PLACED, f"trainer group of {world} worker(s) placed",
                                  {"world_size": world, "plan": plan.as_dict()})
            await group.ready()
            result = await group.train(TrainRequest(run=context, data=data, plan=plan, init_weights_path=init_weights),
                                       evaluator)
            group.shutdown()
            group = None
            await sink.emit_async(EventType.TRAIN_FINISHED, f"trained {result.steps} steps",
                                  {"final_checkpoint": result.final_checkpoint})
            registrar = Registrar.remote()
            actors.append(registrar)
            registration = await registrar.register.remote(RegisterRequest(run=context,
                                                                           final_checkpoint=result.final_checkpoint))
            await sink.emit_async(EventType.COMPLETED,
                                  f"registered {registration.model_name} version {registration.model_version}",
                                  registration.model_dump())
            await asyncio.to_thread(tracking.end_run, self.settings, context.mlflow_run_id, "FINISHED")
        except asyncio.CancelledError:
            self._release(actors, group)
            actors, group = [], None
            await sink.emit_async(EventType.CANCELED, "canceled by the user")
            await asyncio.to_thread(tracking.end_run, self.settings, context.mlflow_run_id, "KILLED")
        except Exception as error:  # noqa: BLE001 - every failure of a run is recorded, never raised
            self._release(actors, group)
            actors, group = [], None
            await self._fail(name, failure_reason(error), error)
        finally:
            self._release(actors, group)
            self.active.pop(name, None)
            self._dispatch()

    async def _fail(self, name: str, reason: str, error: BaseException | None) -> None:
        sink = EventSink("scheduler", name)
        payload = {"error": reason}
        if error is not None:
            payload["error_type"] = type(error).__name__
            payload["traceback"] = "".join(traceback.format_exception(error))[-20000:]
        await sink.emit_async(EventType.FAILED_EXCEPTION, reason, payload)
        await sink.emit_async(EventType.FAILED, "the run failed")
        context = self.specs.get(name)
        if context and context.mlflow_run_id:
            try:
                await asyncio.to_thread(tracking.end_run, self.settings, context.mlflow_run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the log already says why; MLflow status is secondary
                pass

    @staticmethod
    def _release(actors: list[Any], group: TrainerGroup | None) -> None:
        if group is not None:
            group.shutdown()
        for actor in actors:
            ray.kill(actor, no_restart=True)


def get_or_create() -> "ray.actor.ActorHandle":
    return Scheduler.options(name=ACTOR_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()


