"""`make demo`: fine-tune SmolLM2-135M-Instruct on a small chat dataset shipped with the package, register it in
MLflow, and print eval loss and a generation before and after. Runs on a 2-core CPU in a few minutes."""
from __future__ import annotations

import json
import time
from importlib import resources

from rich.console import Console

from ray_finetune import events
from ray_finetune import foundation_model as fm

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "Hey! How was your weekend?"


def main() -> None:
    console = Console()
    data = resources.files("ray_finetune") / "demo_data"
    started = time.monotonic()
    run = fm.create(
        model=MODEL, train_data_path=str(data / "chat_train.jsonl"), eval_data_path=str(data / "chat_eval.jsonl"),
        register_to="main.demo", eval_prompts=[PROMPT], training_duration="2ep", learning_rate=5e-5,
        context_length=512, checkpoints_to_keep=1,   # a SmolLM2 checkpoint takes 2.1 GB; a demo needs the last
    )
    console.print(f"created [bold]{run.name}[/bold] ({run.status.value}); checkpoints under {run.save_folder}")
    from ray_finetune.cli import _follow_with_progress

    final = _follow_with_progress(run.name)
    console.print(f"\n{final.name}: [bold]{final.status.value}[/bold] in {time.monotonic() - started:.0f} s"
                  + (f" — {final.details}" if final.details else ""))
    if final.status.value != "COMPLETED":
        raise SystemExit(1)
    # The evaluations are events too: one SQL query over the log gives "before" (step 0) and "after".
    evaluations = events.sql(
        f"SELECT payload FROM events WHERE run_name = '{final.name}' AND type = 'EVALUATED' ORDER BY seq")
    results = [json.loads(p) for p in evaluations["payload"]]
    before, after = results[0], results[-1]
    console.print(f"eval loss: before {before['eval_loss']:.4f} → after {after['eval_loss']:.4f} "
                  f"(perplexity {before['eval_perplexity']:.1f} → {after['eval_perplexity']:.1f})")
    console.print(f"[bold]prompt:[/bold] {PROMPT}")
    console.print(f"[bold]before:[/bold] {before['generations'][0]['generation']}")
    console.print(f"[bold]after:[/bold]  {after['generations'][0]['generation']}")
    registered = events.sql(
        f"SELECT payload ->> 'model_name' AS name, payload ->> 'model_version' AS version FROM events "
        f"WHERE run_name = '{final.name}' AND type = 'REGISTERED'")
    name, version = registered["name"][0], registered["version"][0]
    console.print(f"registered as models:/{name}/{version}; serving it through MLflow:")
    import mlflow

    from ray_finetune import settings

    mlflow.set_tracking_uri(settings.load().tracking_uri)
    mlflow.set_registry_uri(settings.load().tracking_uri)
    generator = mlflow.transformers.load_model(f"models:/{name}/{version}")
    reply = generator([{"role": "user", "content": PROMPT}], max_new_tokens=40, do_sample=False)
    console.print(f"[bold]served:[/bold] {reply[0]['generated_text'][-1]['content']}")


if __name__ == "__main__":
    main()
