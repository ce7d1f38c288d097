"""The DeepSpeed trainer group: N worker actors (one per device) forming one torch.distributed group.

The scheduler creates a group per run inside a placement group, starts `train` on every rank and awaits them all;
all ranks evaluate each checkpoint (eval data, eval prompts); rank 0 reports progress and checkpoints as events
and hands what was evaluated to the evaluator, which records it.

The scheduler imports this module, and so does every driver that looks the scheduler up (Ray loads an actor's class
to hand out its handle): what only the trainer processes run (torch, transformers, the training loop) is imported
inside the methods that run there, not here, or `ray-finetune runs list` would spend seconds importing them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.event_sink import EventSink
from actors.messages import EvaluateRequest, EvaluationResult, StopRequest, TrainRequest, TrainResult
from eventstore.schema import EventType, NewEvent
from ray_finetune import storage
from ray_finetune.ports import free_port
from ray_finetune.tracking import now_ms
from ray_finetune.train.distributed import import_deepspeed, join_process_group, prefer_expandable_gpu_memory
from ray_finetune.train.plan import TrainingPlan

if TYPE_CHECKING:
    from ray_finetune.train.evaluation import EvalResult
    from ray_finetune.train.loop import StepReport
    from ray_finetune.train.publishing import Published


# Per-step reporting must cost a small step next to nothing (a GPU step of a small model takes tens of ms):
# TRAIN_UPDATED events go to the event store together, in one message and one transaction for all the steps since
# the last, at most SEND_EVERY_S apart, and are acknowledged later; MLflow metrics (a sqlite or HTTP write each) are
# written in batches. Both are flushed (sent and acknowledged) at least FLUSH_EVERY_S apart, before every checkpoint
# event, and when training ends.
SEND_EVERY_S = 0.5
FLUSH_EVERY_S = 5.0


class EventReporter:
    """Rank 0's window on the world: events, MLflow metrics, and evaluation of each checkpoint."""

    def __init__(self, request: TrainRequest, evaluator: Any, stop_flag: Callable[[], int]) -> None:
        self._request, self._evaluator, self._stop_flag = request, evaluator, stop_flag
        self._sink = EventSink("trainer_group", request.run.run_name)
        self._updates: list[NewEvent] = []   # TRAIN_UPDATED events not sent yet
        self._unacknowledged: list[Any] = []
        self._metrics: list[tuple[int, int, dict[str, float]]] = []   # (step, time_ms, values)
        self._flushed_at = self._sent_at = time.monotonic()
        self._checkpoints_in_progress: set[int] = set()   # steps of checkpoints begun and not complete yet

    @property
    def completing_checkpoint(self) -> bool:
        """Whether a checkpoint is being written or uploaded (on object storage: while training goes on)."""
        return bool(self._checkpoints_in_progress)

    def _send_updates(self) -> None:
        if self._updates:
            self._unacknowledged.append(self._sink.submit_all(self._updates))
            self._updates = []
        self._sent_at = time.monotonic()

    def flush(self) -> None:
        """Send the step events not sent yet, and wait until every event sent is durable and the buffered metrics
        are written to MLflow (by the evaluator, whose process has MLflow loaded and connected: this one never
        imports it)."""
        self._send_updates()
        if self._metrics:
            self._unacknowledged.append(self._evaluator.record_training_metrics.remote(
                self._request.run.mlflow_run_id, list(self._metrics)))
            self._metrics.clear()
        ray.get(self._unacknowledged)
        self._unacknowledged.clear()
        self._flushed_at = time.monotonic()

    close = flush

    def model_initialized(self, info: dict[str, Any]) -> None:
        memory = info.get("memory") or {}
        self._sink.emit(EventType.MODEL_INITIALIZED, f"{info['parameters']:,} parameters on {info['world_size']} "
                        f"{info['device'].split(':')[0]} worker(s), {info['precision']}, "
                        f"{info['attention']} attention"
                        + (", activations recomputed" if info.get("activation_checkpointing") else "")
                        + (f", needs ~{memory['needed_gb']:g} of {memory['budget_gb']:g} GiB per worker"
                           if "needed_gb" in memory else ""), info)
        plan = TrainingPlan(**info["plan"])   # the micro-batch may have been fitted to the GPU
        self._sink.emit(EventType.TRAIN_STARTED, f"training for {_counted(plan.total_steps, 'step')} of "
                        f"{_counted(plan.global_batch_rows, 'row')} "
                        f"({micro_batch_note(plan.micro_batch_rows, info)})",
                        {"plan": plan.as_dict()})

    def step_finished(self, report: StepReport) -> None:
        payload = {
            "step": report.step, "total_steps": report.total_steps, "epoch": report.epoch, "loss": report.loss,
            "token_accuracy": report.token_accuracy, "grad_norm": report.grad_norm,
            "learning_rate": report.learning_rate, "tokens": report.tokens, "target_tokens": report.target_tokens,
            "tokens_per_second": report.tokens_per_second, "step_seconds": report.step_seconds,
            "estimated_end_time": report.estimated_end_time.isoformat(),
        }
        self._updates.append(self._sink.event(
            EventType.TRAIN_UPDATED, f"step {report.step}/{report.total_steps} loss {report.loss:.4f} "
            f"grad norm {report.grad_norm:.3g} {report.tokens_per_second:,.0f} tok/s", payload))
        self._metrics.append((report.step, now_ms(), {
            "train_loss": report.loss, "learning_rate": report.learning_rate,
            "tokens_per_second": report.tokens_per_second, "train_token_accuracy": report.token_accuracy,
            "grad_norm": report.grad_norm,
        }))
        now = time.monotonic()
        if now - self._flushed_at >= FLUSH_EVERY_S:
            self.flush()
        elif now - self._sent_at >= SEND_EVERY_S:
            self._send_updates()

    def stop_requested(self) -> int:
        return self._stop_flag()

    def saving_checkpoint(self, step: int) -> None:
        self._checkpoints_in_progress.add(step)
        self.flush()   # every step the checkpoint will hold is in the log before it exists (loop._checkpoint)

    def checkpoint_removed(self, path: str) -> None:
        self._send_updates()   # after the events of the steps before it
        self._sink.emit(EventType.CHECKPOINT_REMOVED, f"removed {os.path.basename(path)} (retention)", {"path": path})

    def checkpoint_saved(self, published: Published) -> None:
        self.flush()   # a checkpoint's event comes after those of the steps it holds
        path = storage.location_of(published.path)
        how = f"training paused {published.write_seconds:.1f} s to write it"
        if published.upload_seconds is not None:
            how += f", uploaded in {published.upload_seconds:.1f} s while training went on"
        message = f"checkpoint {os.path.basename(path)} ({how})"
        refused = published.retention.refused
        if refused:   # the storage keeps more than asked: said where the operator looks, not fatal
            message += ("; retention could not remove " + "; ".join(refused)
                        + " -- it stays, and the next checkpoint tries again")
        self._sink.emit(EventType.CHECKPOINT_SAVED, message,
                        {"path": path, "epoch": published.epoch, "step": published.step,
                         "write_seconds": published.write_seconds, "upload_seconds": published.upload_seconds,
                         "not_removed": list(refused)})
        self._checkpoints_in_progress.discard(published.step)

    def evaluated(self, step: int, epoch: int, result: EvalResult) -> None:
        """The evaluator records what the trainers evaluated (metrics, generations, an EVALUATED event)."""
        ray.get(self._evaluator.evaluate.remote(EvaluateRequest(run=self._request.run, result=EvaluationResult(
            step=step, eval_loss=result.loss, token_accuracy=result.token_accuracy, generations=result.generations))))


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def micro_batch_note(rows: int, info: dict[str, Any]) -> str:
    """How many rows a worker runs at once, and why not more on a GPU (what memory.fit_micro_batch tried)."""
    note = f"{rows} at a time per worker"
    if info.get("micro_batch_rows_limit"):
        note += f"; at most {info['micro_batch_rows_limit']} by RAY_FINETUNE_MICRO_BATCH_TOKENS"
    if info.get("out_of_memory_at"):
        note += f"; {', '.join(map(str, info['out_of_memory_at']))} did not fit in GPU memory"
    else:   # the next size tried, or predicted from the last two and not tried
        timed = {int(size): rate for size, rate in (info.get("rows_per_second") or {}).items()}
        predicted = {int(size): rate for size, rate in (info.get("predicted_rows_per_second") or {}).items()}
        rates = {**timed, **predicted}
        larger = min((size for size in rates if size > rows), default=None)
        if larger is not None and rows in timed:
            note += (f"; {larger} {'would train' if larger in predicted else 'trained'} "
                     f"{rates[larger] / timed[rows] - 1:+.0%} rows/s, not worth the activation memory")
    return note


def train_reporting(train: Callable[[], Any], reporter: Any) -> Any:
    """`train()`, then the reporter's last events and metrics written, also when training failed. If writing them
    fails too, the training error is what the run fails with (its events say why training failed, not that MLflow
    was unreachable at the end); the writing error goes to the worker's log."""
    try:
        outcome = train()
    except BaseException:
        try:
            reporter.close()
        except Exception:  # noqa: BLE001 - secondary to the error being raised
            logging.getLogger(__name__).exception("could not write the last events of a failed training")
        raise
    reporter.close()
    return outcome


# Two threads: one runs `train`, the other answers `request_stop` while it does.
@ray.remote(max_restarts=0, max_concurrency=2)
class TrainerWorker:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        prefer_expandable_gpu_memory()   # before anything in this process touches CUDA
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        try:   # first thing in the process (transformers' model code would import it with MLflow), while placing
            import_deepspeed()
        except Exception:  # noqa: BLE001 - only a head start: train() imports it again and fails the run with why
            pass
        from ray_finetune.train import loop   # torch, transformers: imported while the group is placed

        self._stop = loop.STOP_NONE
        self._reporter: EventReporter | None = None   # rank 0's, while it trains

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def storage_unreached(self, location: str, identity: str) -> str | None:
        """Why this worker's node does not reach the head's storage (None: it does)."""
        return storage.unreached(location, identity)

    def rendezvous_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port(host="")

    def completing_checkpoint(self) -> bool:
        """Whether this rank 0 is writing or uploading a checkpoint now: a stop waits for it (one cut short is lost:
        the run would resume from the checkpoint before)."""
        return self._reporter is not None and self._reporter.completing_checkpoint

    def request_stop(self, request: StopRequest) -> None:
        """Stop at the next step boundary (after a final checkpoint if asked)."""
        from ray_finetune.train import loop

        self._stop = loop.STOP_AND_CHECKPOINT if request.save_checkpoint else loop.STOP

    def train(self, request: TrainRequest, master: tuple[str, int], evaluator: Any) -> TrainResult:
        import torch
        import torch.distributed as dist

        import_deepspeed()   # loaded by __init__ unless that failed: then it fails here, and the run says why
        from ray_finetune.train import loop

        if not torch.cuda.is_available():
            # Ray's CPU count is a scheduling token; the math should use the node's cores, shared by the ranks.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
        join_process_group(self.rank, self.world_size, master)
        config = loop.TrainConfig(
            run_name=request.run.run_name, model_path=request.run.spec.model_path,
            init_weights_path=request.init_weights_path, train_rows_path=request.data.train_rows_path,
            plan=request.plan, learning_rate=request.run.spec.learning_rate, save_folder=request.run.save_folder,
            rank=self.rank, world_size=self.world_size, seed=request.run.spec.seed,
            checkpoint_every=request.run.spec.checkpoint_every,
            checkpoints_to_keep=request.run.spec.checkpoints_to_keep, resume_from=request.resume_from,
            eval_rows_path=request.data.eval_rows_path, eval_prompts=tuple(request.run.spec.eval_prompts),
            task_type=request.run.spec.task_type, evaluate_first=request.attempt == 1 and not request.resume_from,
        )
        self._reporter = EventReporter(request, evaluator, lambda: self._stop) if self.rank == 0 else None
        reporter = self._reporter or loop.SilentReporter()
        outcome = train_reporting(lambda: loop.train(config, reporter), reporter)
        dist.destroy_process_group()
        final = outcome.final_checkpoint
        return TrainResult(final_checkpoint=storage.location_of(final) if final else None,
                           steps=outcome.steps_done, stopped=outcome.stopped)


PLACEMENT_PREFIX = "ray_finetune-trainers-"


def remove_stale_placements() -> int:
    """Placement groups outlive a scheduler that dies; a new scheduler frees those of its predecessor."""
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup

    removed = 0
    for group_id, info in placement_group_table().items():
        if info.get("name", "").startswith(PLACEMENT_PREFIX) and info.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            removed += 1
    return removed


class TrainerGroup:
    """Placement group + workers of one run. Lives in the scheduler; not an actor itself."""

    def __init__(self, world_size: int, cpus_per_worker: int = 1, gpus_per_worker: int = 0, run_name: str = "",
                 resources: dict[str, float] | None = None, environment: dict[str, str] | None = None) -> None:
        self.world_size = world_size
        resources = resources or {}
        # What each worker takes.
        self.bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {}), **resources}
        # PACK: on one node when one has room (fastest collectives), across nodes when none has.
        self._placement = placement_group([dict(self.bundle) for _ in range(world_size)], strategy="PACK",
                                          name=f"{PLACEMENT_PREFIX}{run_name}")
        self._placed = self._placement.ready()   # one readiness check, awaited by placed_within and ready
        self.workers = [
            TrainerWorker.options(
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, resources=resources,
                # merged into the job's environment variables; read when the process starts (train/allocator.py)
                runtime_env={"env_vars": environment} if environment else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, placement_group_bundle_index=i),
            ).remote(i, world_size)
            for i in range(world_size)
        ]

    async def placed_within(self, seconds: float) -> bool:
        """Whether the cluster made room for the whole group within `seconds` (the placement keeps waiting after)."""
        done, _ = await asyncio.wait({asyncio.ensure_future(self._placed)}, timeout=seconds)
        return bool(done)

    async def ready(self) -> list[str]:
        """Wait until the cluster has room for the whole group; the Ray node id of each rank."""
        await self._placed
        return list(await asyncio.gather(*(worker.node_id.remote() for worker in self.workers)))

    async def storage_unreached(self, location: str, identity: str) -> dict[int, str]:
        """rank → why its node does not reach the storage of that identity, for each rank whose node does not."""
        answers = await asyncio.gather(*(w.storage_unreached.remote(location, identity) for w in self.workers))
        return {rank: answer for rank, answer in enumerate(answers) if answer}

    async def request_stop(self, request: StopRequest) -> None:
        await self.workers[0].request_stop.remote(request)

    async def completing_checkpoint(self) -> bool:
        """Whether rank 0 is writing or uploading a checkpoint now (False when it does not answer)."""
        try:
            return await asyncio.wait_for(self.workers[0].completing_checkpoint.remote(), 10)
        except (asyncio.TimeoutError, ray.exceptions.RayActorError):
            return False

    async def train(self, request: TrainRequest, evaluator: Any) -> TrainResult:
        master = await self.workers[0].rendezvous_address.remote()
        results = await asyncio.gather(*(w.train.remote(request, master, evaluator) for w in self.workers))
        return results[0]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        remove_placement_group(self._placement)
