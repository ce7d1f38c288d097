"""The evaluator actor: records a checkpoint's eval scores (computed by the trainers, on their devices) as metrics
and an EVALUATED event, and samples the eval prompts from its weights."""
from __future__ import annotations

import math
import os

import ray
import torch

from actors.event_sink import EventSink
from actors.messages import EvaluateRequest, EvaluationResult
from eventstore.schema import EventType
from ray_finetune import settings, tracking
from ray_finetune.train.models import load_model, load_tokenizer

# SPEC §2: how eval prompts are sampled.
SAMPLING = {"max_new_tokens": 100, "do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95}


def prompt_text(tokenizer, task_type: str, prompt: str) -> str:
    if task_type == "CHAT_COMPLETION" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate(model, tokenizer, task_type: str, prompts: list[str], seed: int) -> list[dict[str, str]]:
    rows = []
    for prompt in prompts:
        torch.manual_seed(seed)
        encoded = tokenizer(prompt_text(tokenizer, task_type, prompt), return_tensors="pt", add_special_tokens=False)
        output = model.generate(**encoded, **SAMPLING, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=model.generation_config.eos_token_id)
        text = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append({"prompt": prompt, "generation": text.strip()})
    return rows


@ray.remote(num_cpus=0, max_restarts=0)
class Evaluator:
    def __init__(self) -> None:
        # It runs while the trainers wait for it, so it may use every core (Ray starts it with one thread).
        torch.set_num_threads(os.cpu_count() or 1)

    def evaluate(self, request: EvaluateRequest) -> EvaluationResult:
        spec = request.run.spec
        result = EvaluationResult(step=request.step)
        metrics: dict[str, float] = {}
        if request.eval_loss is not None:
            loss, accuracy = request.eval_loss, request.token_accuracy
            metrics = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_token_accuracy": accuracy}
            result = result.model_copy(update={"eval_loss": loss, "eval_perplexity": metrics["eval_perplexity"],
                                               "token_accuracy": accuracy})
        if spec.eval_prompts:
            tokenizer = load_tokenizer(spec.model_path)
            model = load_model(request.weights_path).eval()
            generations = generate(model, tokenizer, spec.task_type, spec.eval_prompts, seed=spec.seed + request.step)
            result = result.model_copy(update={"generations": generations})
        config = settings.load()
        if metrics:
            tracking.log_metrics(config, request.run.mlflow_run_id, metrics, step=request.step)
        if result.generations:
            tracking.log_generations(config, request.run.mlflow_run_id, result.generations, step=request.step)
        summary = f"step {request.step}: " + (f"eval loss {result.eval_loss:.4f}, perplexity "
                                               f"{result.eval_perplexity:.2f}" if metrics else "no eval data")
        EventSink("evaluator", request.run.run_name).emit(EventType.EVALUATED, summary, result.model_dump())
        return result
