"""The evaluator actor: records what the trainers evaluated at a checkpoint (they score the eval data and sample the
eval prompts on their own devices: train/evaluation.py) as MLflow metrics, a table of generations and an
EVALUATED event."""
from __future__ import annotations

import math

import ray

from actors.event_sink import EventSink
from actors.messages import EvaluateRequest, EvaluationResult
from eventstore.schema import EventType
from ray_finetune import settings, tracking


@ray.remote(num_cpus=0, max_restarts=0)
class Evaluator:
    def __init__(self) -> None:
        # Connected while the trainers start, so the first (baseline) evaluation does not wait for MLflow's imports.
        try:
            tracking.open_store(settings.load())
        except Exception:  # noqa: BLE001 - only a head start: evaluate() meets any real problem and reports it
            pass

    def evaluate(self, request: EvaluateRequest) -> EvaluationResult:
        result = EvaluationResult(step=request.step, generations=request.generations)
        metrics: dict[str, float] = {}
        if request.eval_loss is not None:
            loss, accuracy = request.eval_loss, request.token_accuracy
            metrics = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_token_accuracy": accuracy}
            result = result.model_copy(update={"eval_loss": loss, "eval_perplexity": metrics["eval_perplexity"],
                                               "token_accuracy": accuracy})
        config = settings.load()
        if metrics:
            tracking.log_metrics(config, request.run.mlflow_run_id, metrics, step=request.step)
        if result.generations:
            tracking.log_generations(config, request.run.mlflow_run_id, result.generations, step=request.step)
        summary = f"step {request.step}: " + (f"eval loss {result.eval_loss:.4f}, perplexity "
                                               f"{result.eval_perplexity:.2f}" if metrics else "no eval data")
        EventSink("evaluator", request.run.run_name).emit(EventType.EVALUATED, summary, result.model_dump())
        return result
