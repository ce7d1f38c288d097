"""The evaluator actor: records in MLflow what the trainers measured. Every few seconds, the training metrics of the
steps since the last batch; at a checkpoint, what the trainers evaluated (they score the eval data and sample the
eval prompts on their own devices: train/evaluation.py) as metrics, a table of generations and an EVALUATED event.
The trainer processes themselves never import MLflow (seconds of each one's start)."""
from __future__ import annotations

import ray

from actors.event_sink import EventSink
from actors.messages import EvaluateRequest
from eventstore.schema import EventType
from ray_finetune import settings, tracking


@ray.remote(num_cpus=0, max_restarts=0)
class Evaluator:
    def __init__(self) -> None:
        # Connected while the trainers start, so the first metrics and evaluation do not wait for MLflow's imports.
        try:
            tracking.open_store(settings.load())
        except Exception:  # noqa: BLE001 - only a head start: evaluate() meets any real problem and reports it
            pass

    def record_training_metrics(self, mlflow_run_id: str, steps: list[tuple[int, dict[str, float]]]) -> None:
        tracking.log_metric_history(settings.load(), mlflow_run_id, steps)

    def evaluate(self, request: EvaluateRequest) -> None:
        result, config = request.result, settings.load()
        if result.eval_loss is not None:
            tracking.log_metrics(config, request.run.mlflow_run_id,
                                 {"eval_loss": result.eval_loss, "eval_perplexity": result.eval_perplexity,
                                  "eval_token_accuracy": result.token_accuracy}, step=result.step)
        if result.generations:
            tracking.log_generations(config, request.run.mlflow_run_id, result.generations, step=result.step)
        summary = f"step {result.step}: " + (f"eval loss {result.eval_loss:.4f}, perplexity "
                                              f"{result.eval_perplexity:.2f}" if result.eval_loss is not None
                                              else "no eval data")
        EventSink("evaluator", request.run.run_name).emit(EventType.EVALUATED, summary, result.model_dump())
