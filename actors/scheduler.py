"""The scheduler actor (one per cluster, detached, named): accepts runs, keeps the queue, and drives each run
through its chain of actor messages:

    CREATED → QUEUED → STARTED → data packer (DATA_PROGRESS…, DATA_VALIDATED) → trainer group
    (PLACED, MODEL_INITIALIZED, TRAIN_STARTED, baseline scores → evaluator, TRAIN_UPDATED… + metrics → evaluator,
    CHECKPOINT_SAVED (on object storage once uploaded, training going on meanwhile) + scores → evaluator)
    → TRAIN_FINISHED → registrar (REGISTERED) → COMPLETED
    a worker dies            → REQUEUED → STARTED again, resuming from the newest complete checkpoint
                               (after MAX_ATTEMPTS: FAILED_EXCEPTION with every attempt's reason → FAILED)
    a trainer's node does not read back the storage identity the head wrote (not the same storage), or
    cannot write there       → FAILED_EXCEPTION naming the node, before it trains → FAILED
    any other failure        → FAILED_EXCEPTION (the reason) → FAILED
    cancel                   → CANCEL_REQUESTED → (stop at a step boundary, final checkpoint if asked) → CANCELED
    resume (stopped/failed)  → RESUMED → STARTED again, continuing from the newest complete checkpoint

Nothing here is stored: on every (re)start the queue is rebuilt by replaying the log, and runs that were in
flight when the scheduler or the head went away are requeued and resumed.
"""
from __future__ import annotations

import asyncio
import random
import re
import string
import traceback
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, NodeDiedError, OwnerDiedError, RayActorError, RayTaskError

from actors import data_packer, evaluator, registrar
from actors.event_sink import EventSink, event_store, one_per_cluster
from actors.messages import PackRequest, RegisterRequest, RunContext, StopRequest, TrainRequest
from actors.trainer_group import TrainerGroup, remove_stale_placements
from eventstore.schema import PENDING, QUEUED, RESUMABLE_STATUSES, EventType
from ray_finetune import settings, storage, tracking
from ray_finetune.data.packing import packed_data_id
from ray_finetune.errors import ConfigError, one_line
from ray_finetune.spec import RunSpec
from ray_finetune.train import allocator, checkpoint
from ray_finetune.train.plan import continued_plan, make_plan, trainer_group_size

ACTOR_NAME = "ray_finetune_scheduler"
MAX_ATTEMPTS = 3            # a run that keeps dying is not retried forever
PLACEMENT_PATIENCE_S = 5.0  # a trainer group not placed by then is waiting for resources: say so in the log
_INTERRUPTIONS = (ActorDiedError, RayActorError, NodeDiedError, OwnerDiedError)


class PlacementTimeoutError(RuntimeError):
    """The cluster did not make room for a run's trainer group in time (settings.placement_timeout_s)."""


def _listed(resources: dict[str, float]) -> str:
    """Ray resources as an operator reads them: "CPU 1, GPU 1"."""
    return ", ".join(f"{resource} {amount:g}" for resource, amount in resources.items())


def _context_of(state: Any) -> RunContext:
    """What the actors need of a run, from its replayed state (a restarted scheduler's, or a resumed run's)."""
    return RunContext(run_name=state.name, spec=RunSpec(**state.spec), mlflow_run_id=state.run_id or "",
                      save_folder=state.save_folder or "")


def run_name_for(model: str, taken: set[str]) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-")[:32] or "run"
    while True:
        name = f"{stem}-{''.join(random.choices(string.ascii_lowercase, k=6))}"
        if name not in taken:
            return name


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def is_interruption(error: BaseException) -> bool:
    """A process or node went away (retry from a checkpoint), as opposed to an error in the run itself."""
    return isinstance(_root_cause(error), _INTERRUPTIONS)


def failure_reason(error: BaseException) -> str:
    """One line an operator can act on."""
    cause = _root_cause(error)
    if isinstance(cause, _INTERRUPTIONS):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return f"a worker of this run died unexpectedly (its process was killed or crashed): {first}"
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)
class Scheduler:
    async def __init__(self) -> None:
        self.settings = settings.load()
        self.store = event_store()
        self.queue: list[str] = []
        self.specs: dict[str, RunContext] = {}
        self.active: dict[str, asyncio.Task] = {}
        self.groups: dict[str, TrainerGroup] = {}
        self.cancelling: dict[str, bool] = {}   # run → save a final checkpoint
        self.names: set[str] = set()
        self._mlflow = asyncio.Lock()           # MLflow's sqlite store takes one writer at a time
        self._admission = asyncio.Lock()        # CREATED order = queue order, however many drivers submit at once
        data_packer.get_or_create()             # started now: they get ready while the first run is submitted
        registrar.get_or_create()
        await self._recover()

    # -- the queue ---------------------------------------------------------------------------------------------
    async def _recover(self) -> None:
        """Rebuild the queue from the log; runs that were mid-flight are requeued first, in their order."""
        remove_stale_placements()   # nothing runs yet in this incarnation, so every trainer placement is stale
        interrupted: list[str] = []
        for state in await self.store.run_states.remote():
            self.names.add(state.name)
            if state.is_terminal or state.deleted:
                continue
            self.specs[state.name] = _context_of(state)
            if state.status in (PENDING, QUEUED):
                self.queue.append(state.name)
            else:
                interrupted.append(state.name)
        for name in reversed(interrupted):
            await self._requeue_or_fail(name, "the scheduler restarted (the head node or the scheduler process "
                                        "was lost) while the run was in flight", None)
        self._dispatch()

    async def submit(self, spec: RunSpec) -> Any:
        async with self._admission:
            name = await self._admit(spec)
        return await self.store.run_state.remote(name)

    async def _admit(self, spec: RunSpec) -> str:
        name = run_name_for(spec.model, self.names)
        self.names.add(name)
        experiment = tracking.experiment_path_for(spec.created_by, name, spec.experiment_path)
        async with self._mlflow:
            try:
                tracked = await asyncio.to_thread(tracking.start_run, self.settings, experiment_path=experiment,
                                                  run_name=name, params=spec.model_dump())
            except ConfigError:
                raise
            except Exception as error:   # the driver gets one line, not the tracking client's traceback
                raise ConfigError(f"MLflow did not create the run's experiment {experiment!r} and run in the "
                                  f"tracking store: {one_line(error)[:2000]}") from None
        sink = EventSink("scheduler", name)
        await sink.submit_all([   # one transaction: a run is never in the log created but not queued
            sink.event(EventType.CREATED, f"run created by {spec.created_by}", {
                "spec": spec.model_dump(), "experiment_id": tracked.experiment_id, "run_id": tracked.run_id,
                "save_folder": tracked.save_folder, "experiment_path": experiment}),
            sink.event(EventType.QUEUED, f"queued behind {len(self.queue) + len(self.active)} run(s)",
                       {"position": len(self.queue)})])
        self.specs[name] = RunContext(run_name=name, spec=spec, mlflow_run_id=tracked.run_id,
                                      save_folder=tracked.save_folder)
        self.queue.append(name)
        self._dispatch()
        return name

    async def queued(self) -> list[str]:
        return list(self.queue)

    async def active_runs(self) -> list[str]:
        return list(self.active)

    async def settings_used(self) -> dict[str, str]:
        """The settings this cluster's runs use (read when it started), as environment variables."""
        return self.settings.as_env()

    async def tracking_store(self) -> tuple[str, str | None]:
        """MLFLOW_TRACKING_URI as it may be shown, and why the head cannot reach it (None: it can)."""
        try:
            await asyncio.to_thread(tracking.ensure_reachable, self.settings)
            problem = None
        except ConfigError as error:
            problem = str(error)
        return settings.without_password(self.settings.tracking_uri), problem

    async def storage(self) -> tuple[str, str]:
        """RAY_FINETUNE_STORAGE and its identity, which `ray-finetune status` checks every node against."""
        return self.settings.storage_location, await self._storage()

    def _dispatch(self) -> None:
        while self.queue and len(self.active) < self.settings.max_concurrent_runs:
            name = self.queue.pop(0)
            self.active[name] = asyncio.get_running_loop().create_task(self._supervise(name))

    # -- resume ------------------------------------------------------------------------------------------------
    async def resume(self, name: str, by: str) -> str | None:
        """Queue a stopped or failed run again, to continue exactly where its newest complete checkpoint left it
        (weights, optimizer, schedule, data position, random state). Returns why not, or None when queued."""
        async with self._admission:
            state = await self.store.run_state.remote(name)
            if state is None or state.deleted:
                return "no such run"
            if state.status not in RESUMABLE_STATUSES:
                return f"it is {state.status}; only a STOPPED or FAILED run can be resumed"
            if name in self.active or name in self.queue:   # its actors are still being released
                return f"it is {state.status} but still winding down; try again in a moment"
            context = _context_of(state)
            latest = checkpoint.latest_complete(checkpoint.checkpoints_dir(context.save_folder, name))
            if latest is None:
                return ("it saved no complete checkpoint to continue from; create it again (a run cancelled with "
                        "save_checkpoint=True always leaves one)")
            await EventSink("scheduler", name).emit_async(
                EventType.RESUMED, f"resumed by {by}, to continue from {latest.name}",
                {"by": by, "resume_from": storage.location_of(latest), "after": state.status})
            try:
                async with self._mlflow:
                    await asyncio.to_thread(tracking.reopen_run, self.settings, context.mlflow_run_id)
            except Exception:  # noqa: BLE001 - MLflow's status flag is secondary to the log
                pass
            self.specs[name] = context
            self.queue.append(name)
            self._dispatch()
            return None

    # -- cancel ------------------------------------------------------------------------------------------------
    async def cancel(self, names: list[str], save_checkpoint: bool = False) -> list[str]:
        """Stop each named run that is not finished; returns the names actually stopped. Running runs are stopped
        all at once: stopped one after another, each would go on training (on its devices) while the ones before it
        wound down, checkpoint included."""
        names = list(dict.fromkeys(names))
        queued = [name for name in names if name in self.queue]
        self.queue = [name for name in self.queue if name not in queued]   # at once: none may start meanwhile
        if queued:   # one transaction and one tracking-store check for all of them, however many
            await self.store.append.remote([EventSink("scheduler", name).event(
                EventType.CANCELED, "canceled before it started") for name in queued])
            await self._end_mlflow_runs(queued, "KILLED")
        active = [name for name in names if name in self.active]
        await asyncio.gather(*(self._stop_active(name, save_checkpoint) for name in active))
        return queued + active

    async def _stop_active(self, name: str, save_checkpoint: bool) -> None:
        await EventSink("scheduler", name).emit_async(EventType.CANCEL_REQUESTED, "cancel requested",
                                                      {"save_checkpoint": save_checkpoint})
        self.cancelling[name] = save_checkpoint
        task = self.active[name]
        group = self.groups.get(name)
        if group is not None:
            try:  # the trainers stop at the next step boundary and the supervisor records CANCELED
                await asyncio.wait_for(group.request_stop(StopRequest(save_checkpoint=save_checkpoint)), 10)
                await asyncio.wait({task}, timeout=self.settings.stop_grace_s)
                # A checkpoint being written or uploaded (the final one asked for, or one uploading in the
                # background since its step) is not cut short: a stop waits for it, a grace period at a time.
                while not task.done() and await group.completing_checkpoint():
                    await asyncio.wait({task}, timeout=self.settings.stop_grace_s)
            except (asyncio.TimeoutError, RayActorError):
                pass
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # -- one run -----------------------------------------------------------------------------------------------
    async def _supervise(self, name: str) -> None:
        context = self.specs[name]
        sink = EventSink("scheduler", name)
        try:
            state = await self.store.run_state.remote(name)
            attempt = state.attempts + 1
            identity = await self._storage()
            resume_from = await asyncio.to_thread(checkpoint.latest_complete,
                                                  checkpoint.checkpoints_dir(context.save_folder, name))
            await sink.emit_async(EventType.STARTED, "starting the run's actors" + (
                f" (attempt {attempt}, resuming from {resume_from.name})" if resume_from else
                f" (attempt {attempt})" if attempt > 1 else ""), {
                    "attempt": attempt, "resume_from": storage.location_of(resume_from) if resume_from else None})
            registering = registrar.get_or_create()
            registering.prepare.remote(context.spec.model_path)   # the model's code imported while the run trains
            evaluating = evaluator.get_or_create()   # records the run's metrics, and its evaluations if any
            evaluating.prepare.remote()
            packer, request = data_packer.get_or_create(), PackRequest(run=context)
            try:
                data = await packer.pack.remote(request)
            except asyncio.CancelledError:   # cancelled while packing: the shared packer stops this request only
                packer.abandon.remote(request.request_id)
                raise
            saved = None   # the trainer state of the checkpoint resumed from
            if resume_from:   # before any GPU is taken: a deterministic refusal
                saved = await asyncio.to_thread(checkpoint.read_state, resume_from)
                checkpoint.ensure_same_data(resume_from, saved, packed_data_id(data.train_rows_path))
            gpus = int(ray.cluster_resources().get("GPU", 0))
            world, on_gpus = trainer_group_size(gpus, self.settings.trainer_device, self.settings.trainer_workers,
                                                self.settings.max_concurrent_runs)
            plan = (continued_plan(saved["plan"], world) if saved is not None else
                    make_plan(rows=int(data.train_stats["rows"]), tokens=int(data.train_stats["tokens"]),
                              duration=context.spec.duration, world_size=world, seed=context.spec.seed))
            world = plan.world_size
            init_weights = (storage.location_of(await asyncio.to_thread(   # a pointer on a bucket: requests
                checkpoint.initial_weights, "custom_weights_path", context.spec.custom_weights_path))
                            if context.spec.custom_weights_path else None)
            group = TrainerGroup(world, gpus_per_worker=int(on_gpus), run_name=name,
                                 resources=self.settings.trainer_resources,
                                 environment=allocator.trainer_environment(on_gpus, self.settings.allocator))
            self.groups[name] = group
            nodes = await self._placed(group, sink, self.settings.placement_timeout_s)
            await sink.emit_async(EventType.PLACED, f"trainer group of {world} worker(s) placed on "
                                  f"{len(set(nodes))} node(s)", {"world_size": world, "nodes": nodes,
                                                                 "plan": plan.as_dict()})
            await self._ensure_storage_reached(group, nodes, identity)
            result = await group.train(TrainRequest(run=context, data=data, plan=plan, init_weights_path=init_weights,
                                                    resume_from=storage.location_of(resume_from) if resume_from
                                                    else None,
                                                    attempt=attempt), evaluating)
            self._release(name)
            if result.stopped or name in self.cancelling:
                await self._canceled(name, result.final_checkpoint if self.cancelling.get(name) else None)
                return
            await sink.emit_async(EventType.TRAIN_FINISHED, f"trained {result.steps} steps",
                                  {"final_checkpoint": result.final_checkpoint})
            registration = await registering.register.remote(RegisterRequest(
                run=context, final_checkpoint=result.final_checkpoint))
            await sink.emit_async(EventType.COMPLETED,
                                  f"registered {registration.model_name} version {registration.model_version}",
                                  registration.model_dump())
            await self._end_mlflow_runs([name], "FINISHED")
        except asyncio.CancelledError:
            self._release(name)
            await self._canceled(name, None)
        except Exception as error:  # noqa: BLE001 - every failure of a run is recorded, never raised
            self._release(name)
            if name in self.cancelling:
                await self._canceled(name, None)
            elif is_interruption(error):
                await self._requeue_or_fail(name, failure_reason(error), error)
            else:
                await self._fail(name, failure_reason(error), error)
        finally:
            self._release(name)
            self.cancelling.pop(name, None)
            self.active.pop(name, None)
            self._dispatch()

    async def _storage(self) -> str:
        """The identity of RAY_FINETUNE_STORAGE as the head reads it now (written on first use); ConfigError when
        the head cannot reach it. One small read, asked again for every run: an outage of the store since the last
        run is named here, before anything else of the run reads or writes."""
        return await asyncio.to_thread(storage.identity, self.settings.storage)

    async def _ensure_storage_reached(self, group: TrainerGroup, nodes: list[str], identity: str) -> None:
        """Every node of the trainer group (`nodes`: the Ray node id of each rank) reads and writes the storage the
        head writes, or the run fails now, naming the nodes that do not, instead of on the first file a trainer cannot
        find, at its first checkpoint, or with a checkpoint torn across disks."""
        unreached = await group.storage_unreached(self.settings.storage_location, identity)
        if unreached:
            address = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
            raise ConfigError(
                f"nodes of the trainer group do not reach RAY_FINETUNE_STORAGE={self.settings.storage_location} as "
                "the head does: " + "; ".join(f"node {address.get(nodes[rank], nodes[rank])} (rank {rank}): {why}"
                                              for rank, why in unreached.items())
                + f". {storage.reach_advice(self.settings.storage)}")

    async def _canceled(self, name: str, final_checkpoint: str | None) -> None:
        message = "canceled by the user" + (f"; final checkpoint {Path(final_checkpoint).name}"
                                            if final_checkpoint else "")
        await EventSink("scheduler", name).emit_async(EventType.CANCELED, message,
                                                      {"final_checkpoint": final_checkpoint})
        await self._end_mlflow_runs([name], "KILLED")

    async def _requeue_or_fail(self, name: str, reason: str, error: BaseException | None) -> None:
        state = await self.store.run_state.remote(name)
        reasons = [*state.interruptions, reason]
        if state.attempts >= MAX_ATTEMPTS:
            summary = f"gave up after {state.attempts} attempts: " + "; ".join(
                f"attempt {i}: {r}" for i, r in enumerate(reasons, 1))
            await self._fail(name, summary, error)
            return
        await EventSink("scheduler", name).emit_async(
            EventType.REQUEUED, f"requeued after an interruption: {reason}",
            {"reason": reason, "attempts": state.attempts})
        self.queue.insert(0, name)

    async def _fail(self, name: str, reason: str, error: BaseException | None) -> None:
        sink = EventSink("scheduler", name)
        payload: dict[str, Any] = {"error": reason}
        if error is not None:
            payload["error_type"] = type(_root_cause(error)).__name__
            payload["traceback"] = "".join(traceback.format_exception(error))[-20000:]
        # One transaction: a scheduler lost between the two would find the run in flight and run it again.
        await sink.submit_all([sink.event(EventType.FAILED_EXCEPTION, reason, payload),
                               sink.event(EventType.FAILED, "the run failed")])
        await self._end_mlflow_runs([name], "FAILED")

    async def _end_mlflow_runs(self, names: list[str], status: str) -> None:
        run_ids = [context.mlflow_run_id for context in map(self.specs.get, names) if context and context.mlflow_run_id]
        if not run_ids:
            return
        try:
            async with self._mlflow:
                await asyncio.to_thread(tracking.end_runs, self.settings, run_ids, status)
        except Exception:  # noqa: BLE001 - the log already says how the run ended; MLflow's flag is secondary
            pass

    @staticmethod
    async def _placed(group: TrainerGroup, sink: EventSink, timeout_s: int) -> list[str]:
        """The trainer group's nodes once it is placed. A group that waits (a busy cluster, or GPU nodes an autoscaler
        is starting) gets a WAITING_FOR_RESOURCES event naming what it waits for, so a run that sits in STARTING
        says why; one still waiting after `timeout_s` (0: never) fails the run, saying what it waited for and what
        the cluster has, instead of holding its place in the queue forever."""
        if not await group.placed_within(PLACEMENT_PATIENCE_S):
            each = _listed(group.bundle)
            await sink.emit_async(EventType.WAITING_FOR_RESOURCES,
                                  f"waiting for the cluster to free or start {group.world_size} x ({each}) for the "
                                  "trainer group", {"world_size": group.world_size, "bundle": group.bundle})
            if timeout_s and not await group.placed_within(max(0.0, timeout_s - PLACEMENT_PATIENCE_S)):
                has = _listed({resource: amount for resource, amount in sorted(ray.cluster_resources().items())
                               if not resource.startswith(("node:", "memory", "object_store_memory"))})
                raise PlacementTimeoutError(
                    f"the cluster did not make room for the trainer group ({group.world_size} x ({each})) within "
                    f"{timeout_s} s; it has {has or 'nothing'}. Check that nodes with those resources can start "
                    "(`ray status`, the autoscaler's logs), or ask for less (RAY_FINETUNE_TRAINER_DEVICE=cpu, "
                    "RAY_FINETUNE_TRAINER_WORKERS); RAY_FINETUNE_PLACEMENT_TIMEOUT_S=0 waits forever")
        return await group.ready()

    def _release(self, name: str) -> None:
        """The run's trainer group goes (the packer, evaluator and registrar serve the whole cluster)."""
        group = self.groups.pop(name, None)
        if group is not None:
            group.shutdown()


def get_or_create() -> "ray.actor.ActorHandle":
    return one_per_cluster(Scheduler, ACTOR_NAME)
