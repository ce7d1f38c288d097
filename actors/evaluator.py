"""The evaluator actor: records in MLflow what the trainers measured. Every few seconds, the training metrics of the
steps since the last batch; at a checkpoint, what the trainers evaluated (they score the eval data and sample the
eval prompts on their own devices: train/evaluation.py) as metrics, a table of generations and an EVALUATED event.
The trainer processes themselves never import MLflow (seconds of each one's start)."""
from __future__ import annotations

import ray

from actors.event_sink import EventSink, one_per_cluster
from actors.messages import EvaluateRequest
from eventstore.schema import EventType
from ray_finetune import settings, tracking

ACTOR_NAME = "ray_finetune_evaluator"
# Calls at once, a thread each: every run's rank 0 sends its metrics every few seconds, and each call is a few
# MLflow writes.
MAX_CONCURRENT_RECORDS = 16


# If its process dies, Ray starts it again and runs the calls it was running there: a run's trainers wait for
# their metrics to be recorded, and a crash of the process that records them must not interrupt their training.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3, max_concurrency=MAX_CONCURRENT_RECORDS)
class Evaluator:
    """One per cluster (named, detached, on the head node), started by the first run. An evaluator per run
    imported MLflow and connected to the tracking store in a fresh process while the run's trainer started, two
    processes importing at once on the same cores (BENCHMARKS.md); this one pays it once."""

    def prepare(self) -> None:
        """Connect to the tracking store while a run starts, so that its first metrics do not wait for MLflow's
        imports (the first run's only). Started with the scheduler instead, this actor's imports made the head's
        first create() return 2 s later (it imports MLflow too), and a fresh store's schema is created then."""
        try:
            tracking.open_store(settings.load())
        except Exception:  # noqa: BLE001 - only a head start: the first record meets any real problem and reports it
            pass

    def record_training_metrics(self, mlflow_run_id: str, steps: list[tuple[int, int, dict[str, float]]]) -> None:
        """(step, time_ms, values) of each step: stamped by the trainer, so a call run again writes nothing twice."""
        tracking.log_metric_history(settings.load(), mlflow_run_id, steps)

    def evaluate(self, request: EvaluateRequest) -> None:
        result, config = request.result, settings.load()
        if result.eval_loss is not None:
            tracking.log_metrics(config, request.run.mlflow_run_id,
                                 {"eval_loss": result.eval_loss, "eval_perplexity": result.eval_perplexity,
                                  "eval_token_accuracy": result.token_accuracy}, step=result.step,
                                 time_ms=request.time_ms)
        if result.generations:
            tracking.log_generations(config, request.run.mlflow_run_id, result.generations, step=result.step)
        summary = f"step {result.step}: " + (f"eval loss {result.eval_loss:.4f}, perplexity "
                                              f"{result.eval_perplexity:.2f}" if result.eval_loss is not None
                                              else "no eval data")
        EventSink("evaluator", request.run.run_name).emit(EventType.EVALUATED, summary, result.model_dump(),
                                                          key=request.request_id)


def get_or_create() -> "ray.actor.ActorHandle":
    return one_per_cluster(Evaluator, ACTOR_NAME)
