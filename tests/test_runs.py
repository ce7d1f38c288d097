"""Runs through the public API on a local Ray head: create → COMPLETED with a registered model (chats, tool calls,
instruction pairs, continued pretraining on a folder of text files); cancel of a
queued run, of one being tokenized and of a running one; a run that fails in itself (bad data found late, weights
that are not numbers) ends FAILED at once with the reason."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ray_finetune import events as event_log
from ray_finetune import foundation_model as fm
from ray_finetune.entities import RunStatus
from ray_finetune.errors import ValidationError
from ray_finetune.train import allocator
from waiting import wait_until

pytestmark = pytest.mark.cluster


def create(tiny_model, chat_data, **overrides):
    arguments = dict(model=str(tiny_model), train_data_path=str(chat_data[0]), register_to="main.tests",
                     learning_rate=1e-3, context_length=128)
    arguments.update(overrides)
    return fm.create(**arguments)


def wait_for_event(run_name: str, kind: str, timeout_s: float = 120):
    try:
        return wait_until(lambda: [e for e in fm.get_events(run_name) if e.type == kind], timeout_s,
                          f"{run_name} to reach {kind}")[0]
    except AssertionError as error:
        raise AssertionError(f"{error}; its events: {[e.type for e in fm.get_events(run_name)]}") from None


def mlflow_metrics(cluster, run, key: str) -> dict[int, float]:
    """{step: value} of a metric of the run's MLflow run (each step logged once)."""
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=cluster.tracking_uri).get_metric_history(run.run_id, key)
    assert len({m.step for m in history}) == len(history), f"{key} logged twice for a step"
    return {m.step: m.value for m in history}


def mlflow_status(cluster, run) -> str:
    """The MLflow run's status flag (RUNNING, FINISHED, KILLED, FAILED)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cluster.tracking_uri).get_run(run.run_id).info.status


def assert_training_metrics_logged(cluster, run) -> None:
    """The SPEC's MLflow metrics of training: one value per step, the same as the run's TRAIN_UPDATED events."""
    updates = [e.payload for e in fm.get_events(run.name) if e.type == "TRAIN_UPDATED"]
    assert updates
    for key, field in (("train_loss", "loss"), ("learning_rate", "learning_rate"),
                       ("tokens_per_second", "tokens_per_second"), ("train_token_accuracy", "token_accuracy"),
                       ("grad_norm", "grad_norm")):
        assert mlflow_metrics(cluster, run, key) == pytest.approx({u["step"]: u[field] for u in updates}), key


def test_metrics_written_twice_are_kept_once_at_the_time_of_their_step(cluster):
    """What the evaluator writes when Ray runs a call again on its restarted process (tests/test_resume.py)."""
    from mlflow import MlflowClient

    from ray_finetune import tracking

    tracked = tracking.start_run(cluster, experiment_path="/tests/metrics-twice", run_name="metrics-twice", params={})
    steps = [(1, 1_000, {"train_loss": 2.5}), (2, 2_000, {"train_loss": 2.25})]   # (step, time_ms, values)
    tracking.log_metric_history(cluster, tracked.run_id, steps)
    tracking.log_metric_history(cluster, tracked.run_id, steps)
    history = MlflowClient(tracking_uri=cluster.tracking_uri).get_metric_history(tracked.run_id, "train_loss")
    assert sorted((m.step, m.timestamp, m.value) for m in history) == [(1, 1_000, 2.5), (2, 2_000, 2.25)]


def test_a_run_goes_from_create_to_a_registered_model(cluster, tiny_model, chat_data):
    run = create(tiny_model, chat_data, eval_data_path=str(chat_data[1]),
                 eval_prompts=["what is the capital of france?"], training_duration="2ep")
    assert run.status == RunStatus.PENDING and run.name.startswith("model-")
    finished = run.wait(timeout=300)
    assert finished.status == RunStatus.COMPLETED, finished.details
    assert finished.started_at and finished.completed_at and finished.created_at <= finished.started_at

    types = [e.type for e in fm.get_events(run.name)]
    milestones = ["CREATED", "STARTED", "DATA_VALIDATED", "MODEL_INITIALIZED", "TRAIN_STARTED", "TRAIN_UPDATED",
                  "CHECKPOINT_SAVED", "TRAIN_FINISHED", "COMPLETED"]
    assert [types.index(m) for m in milestones] == sorted(types.index(m) for m in milestones)
    assert types[-1] == "COMPLETED" and "QUEUED" not in types  # internal events stay internal
    initialized = next(e.payload for e in fm.get_events(run.name) if e.type == "MODEL_INITIALIZED")
    assert initialized["host_allocator"] == ("tcmalloc" if allocator.tcmalloc_installed()
                                             else "glibc, freed memory kept")   # the CPU trainer's (allocator.py)

    updates = [e.payload for e in fm.get_events(run.name) if e.type == "TRAIN_UPDATED"]
    assert [u["step"] for u in updates] == list(range(1, updates[0]["total_steps"] + 1))
    assert updates[-1]["loss"] < updates[0]["loss"]

    checkpoints = fm.get_checkpoints(run.name)
    steps_per_epoch = updates[0]["total_steps"] // 2
    assert [Path(c).name for c in checkpoints] == [f"ep1-ba{steps_per_epoch}", f"ep2-ba{2 * steps_per_epoch}"]
    pointer = Path(f"{run.save_folder}/{run.name}/checkpoints/latest-sharded-rank0.symlink")
    assert pointer.read_text().strip() == Path(checkpoints[-1]).name
    assert not list(pointer.parent.glob(".tmp-*"))

    counts = event_log.sql(f"SELECT type, count(*) AS n FROM events WHERE run_name = '{run.name}' GROUP BY type")
    counts = dict(zip(counts["type"], counts["n"]))
    assert counts["TRAIN_UPDATED"] == len(updates) and counts["EVALUATED"] == 3  # before training + 2 checkpoints
    status = event_log.sql(f"SELECT status FROM runs WHERE run_name = '{run.name}'")
    assert status["status"].tolist() == ["COMPLETED"]
    evaluations = [json.loads(p) for p in event_log.sql(
        f"SELECT payload FROM events WHERE run_name = '{run.name}' AND type = 'EVALUATED' ORDER BY seq")["payload"]]
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]
    assert evaluations[-1]["generations"][0]["prompt"] == "what is the capital of france?"
    assert_training_metrics_logged(cluster, finished)
    wait_until(lambda: mlflow_status(cluster, finished) == "FINISHED", 30, "the MLflow run flagged FINISHED")
    assert mlflow_metrics(cluster, finished, "eval_loss") == pytest.approx(
        {e["step"]: e["eval_loss"] for e in evaluations})

    import mlflow
    import transformers

    mlflow.set_tracking_uri(cluster.tracking_uri)
    mlflow.set_registry_uri(cluster.tracking_uri)
    generator = mlflow.transformers.load_model(f"models:/main.tests.{run.name}/1")
    assert isinstance(generator, transformers.Pipeline)
    text = generator("what is the capital", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("what is the capital") and len(text) > len("what is the capital")
    assert generator.model.generation_config.eos_token_id == generator.tokenizer.eos_token_id
    assert (Path(run.save_folder) / run.name / "final_model" / "chat_template.jinja").exists()
    assert run.name in [r.name for r in fm.list()]


def test_continued_pretraining_on_a_folder_of_text_files_trains_and_registers(cluster, tiny_model, tmp_path):
    """CONTINUED_PRETRAIN: the .txt files of a folder, found recursively (other files ignored), each a document
    ending in EOS, cut into context_length rows (a longer document continues in the next row), the loss on every
    token; the run trains and registers like any other, on what the dry run counted."""
    import random

    corpus = tmp_path / "corpus"
    (corpus / "deep").mkdir(parents=True)
    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran far away from home".split()
    for index in range(40):
        folder = corpus / "deep" if index % 2 else corpus
        (folder / f"doc{index}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(20, 150))))
    (corpus / "notes.md").write_text("not training data")
    arguments = dict(model=str(tiny_model), train_data_path=str(corpus), register_to="main.tests",
                     task_type="CONTINUED_PRETRAIN", context_length=64, training_duration="2ep", learning_rate=1e-3)
    counted = fm.estimate(**arguments, probe=False)
    assert counted.examples == 40 and counted.truncated_examples == 0 and counted.packing_efficiency > 0.98
    assert 0 < counted.target_tokens < counted.tokens    # every token but the last of each piece is predicted

    finished = fm.create(**arguments).wait(timeout=300)
    assert finished.status == RunStatus.COMPLETED, finished.details
    (validated,) = [e.payload for e in fm.get_events(finished.name) if e.type == "DATA_VALIDATED"]
    assert {key: validated["train"][key] for key in ("examples", "tokens", "target_tokens", "rows")} == {
        "examples": 40, "tokens": counted.tokens, "target_tokens": counted.target_tokens, "rows": counted.rows}
    updates = [e.payload for e in fm.get_events(finished.name) if e.type == "TRAIN_UPDATED"]
    assert len(updates) == counted.total_steps and updates[-1]["loss"] < updates[0]["loss"]
    assert sum(u["target_tokens"] for u in updates) == 2 * counted.target_tokens   # two epochs, every target once each
    assert [e.type for e in fm.get_events(finished.name)][-1] == "COMPLETED"


def test_instruction_finetuning_learns_the_responses_only_and_registers(cluster, tiny_model, tmp_path):
    """INSTRUCTION_FINETUNE: prompt/response pairs (`completion` accepted for `response`), no template; the loss is
    on each response and the EOS appended to it, never on a prompt token; the run registers like any other."""
    from transformers import AutoTokenizer

    pairs = [(f"question {i}: what is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(30)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": prompt, "response" if i % 3 else "completion": response}) + "\n"
                            for i, (prompt, response) in enumerate(pairs)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    responses = sum(len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1 for _, response in pairs)

    finished = create(tiny_model, (data,), task_type="INSTRUCTION_FINETUNE", training_duration="2ep").wait(timeout=300)
    assert finished.status == RunStatus.COMPLETED, finished.details
    (validated,) = [e.payload for e in fm.get_events(finished.name) if e.type == "DATA_VALIDATED"]
    assert validated["train"]["examples"] == 30 and validated["train"]["target_tokens"] == responses
    updates = [e.payload for e in fm.get_events(finished.name) if e.type == "TRAIN_UPDATED"]
    assert sum(u["target_tokens"] for u in updates) == 2 * responses and updates[-1]["loss"] < updates[0]["loss"]


def test_a_base_model_trained_on_chats_stops_at_the_end_of_its_turn_when_served(cluster, chat_data, tmp_path):
    """A base model's EOS ends documents; its chat template ends turns with another token, which chat training
    teaches it to emit. Served, it must stop there, or it writes the user's next turn itself."""
    import mlflow

    from tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "base", eos_token="<|endoftext|>")
    run = create(model, chat_data, training_duration="1ep", eval_prompts=["count to five"]).wait(timeout=300)
    assert run.status == RunStatus.COMPLETED, run.details
    initialized = [e for e in fm.get_events(run.name) if e.type == "MODEL_INITIALIZED"][0].payload
    assert initialized["stop_tokens"] == ["<|endoftext|>", "<|im_end|>"]
    saved = json.loads((Path(run.save_folder) / run.name / "final_model" / "generation_config.json").read_text())

    mlflow.set_tracking_uri(cluster.tracking_uri)
    mlflow.set_registry_uri(cluster.tracking_uri)
    served = mlflow.transformers.load_model(f"models:/main.tests.{run.name}/1")
    eos, end_of_turn = served.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert saved["eos_token_id"] == [eos, end_of_turn]
    prompt = served.tokenizer.apply_chat_template([{"role": "user", "content": "count to five"}],
                                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # Whatever the tiny model would say, make its first word the end of its turn: generation ends right there.
    output = served.model.generate(**prompt, max_new_tokens=20, do_sample=False,
                                   sequence_bias={(end_of_turn,): 100.0})
    assert output[0, prompt["input_ids"].shape[1]:].tolist() == [end_of_turn]


def test_cancel_queued_runs_and_a_running_one_with_a_final_checkpoint(cluster, tiny_model, chat_data):
    running = create(tiny_model, chat_data, training_duration="5000ba")
    queued = [create(tiny_model, chat_data, training_duration="1ba") for _ in range(2)]
    wait_for_event(running.name, "TRAIN_UPDATED")
    assert {fm.get(run.name).status for run in queued} <= {RunStatus.PENDING, RunStatus.QUEUED}

    assert fm.cancel([run.name for run in queued]) == 2
    for run in queued:
        assert fm.get(run.name).status == RunStatus.STOPPED
        assert [e.type for e in fm.get_events(run.name)] == ["CREATED", "CANCELED"]
        assert mlflow_status(cluster, run) == "KILLED"

    # cancel() returns once the run has stopped, at a step boundary (a run killed after the grace period would
    # have no final checkpoint)
    assert fm.cancel(runs=[running.name], save_checkpoint=True) == 1
    stopped = fm.get(running.name)
    assert stopped.status == RunStatus.STOPPED
    events = fm.get_events(running.name)
    assert events[-1].type == "CANCELED"
    last_step = [e for e in events if e.type == "TRAIN_UPDATED"][-1].payload["step"]
    final = Path(fm.get_checkpoints(running.name)[-1])
    assert final.name.endswith(f"-ba{last_step}") and (final / "trainer_state.json").exists()
    assert stopped.details == f"canceled by the user; final checkpoint {final.name}"
    time.sleep(1)
    assert fm.get_events(running.name)[-1].type == "CANCELED"  # nothing trains after the stop
    assert fm.cancel([running.name]) == 0  # already stopped
    assert mlflow_status(cluster, running) == "KILLED"


def test_a_run_cancelled_while_its_data_is_tokenized_stops_there_and_the_packer_serves_the_next(
        cluster, tiny_model, chat_data, tmp_path):
    """One data packer serves every run: cancelling a run in the middle of tokenizing stops that preparation
    (nothing published to the cache, no event of it after CANCELED) and leaves the packer serving the next run."""
    from ray_finetune import settings
    from tiny_model import write_chat_jsonl

    cache = settings.load().packed_data_dir
    big = write_chat_jsonl(tmp_path / "big.jsonl", 60_000)   # 9 MB: about 8 s of tokenizing on 2 CPUs, in shards
    earlier = set(cache.glob("*/work-*"))
    run = create(tiny_model, (big,), training_duration="1ba")
    wait_until(lambda: set(cache.glob("*/work-*")) - earlier, 120, "the preparation to start")   # tokenizing now
    (work,) = set(cache.glob("*/work-*")) - earlier
    assert fm.cancel([run.name]) == 1
    assert fm.get(run.name).status == RunStatus.STOPPED
    # A finished preparation publishes its stats, then removes its work folder; an abandoned one only removes it.
    # ... and the entry's folder, empty then: `data cache` would list it as cut short
    wait_until(lambda: not work.parent.exists(), 120, "the preparation to end")
    assert 60_000 not in [json.loads(f.read_text())["examples"] for f in cache.glob("*/stats.json")]
    types = [e.type for e in fm.get_events(run.name)]
    assert types[-1] == "CANCELED" and "DATA_VALIDATED" not in types and "PLACED" not in types

    assert create(tiny_model, chat_data, training_duration="1ba").wait(timeout=300).status == RunStatus.COMPLETED


def test_the_packer_stops_a_cancelled_request_and_keeps_few_cancellations_of_requests_it_is_not_packing():
    """The packer lives as long as the cluster: runs cancelled just as their data came back must not pile up in it,
    and a cancellation that overtakes its pack (Ray's threads take calls in any order) must still stop it."""
    from actors.data_packer import REMEMBERED_ABANDONMENTS, Abandonments

    requests = Abandonments()
    requests.abandon("early")   # before its pack started
    requests.started("early")
    requests.started("running")
    requests.abandon("running")
    assert requests.is_abandoned("early") and requests.is_abandoned("running")
    for request_id in ("early", "running"):
        requests.finished(request_id)
        assert not requests.is_abandoned(request_id)
    assert len(requests) == 0
    requests.started("long")
    for late in range(3 * REMEMBERED_ABANDONMENTS):   # each after its pack returned
        requests.abandon(f"late-{late}")
    requests.abandon("long")
    assert len(requests) == REMEMBERED_ABANDONMENTS + 1 and requests.is_abandoned("long")


def test_a_failure_in_the_run_itself_ends_failed_at_once_with_the_reason(cluster, tiny_model, tmp_path):
    data = tmp_path / "late_error.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + "not json\n")
    run = create(tiny_model, (data,), validate_inputs=False, training_duration="1ba")
    finished = run.wait(timeout=120)
    assert finished.status == RunStatus.FAILED
    assert "train_data_path" in finished.details and "line 2" in finished.details
    types = [e.type for e in fm.get_events(run.name)]
    assert "REQUEUED" not in types and types[-2:] == ["FAILED_EXCEPTION", "FAILED"]
    wait_until(lambda: mlflow_status(cluster, run) == "FAILED", 30, "the MLflow run flagged FAILED")
    # The operator's one query:
    details = event_log.sql(f"SELECT details FROM runs WHERE run_name = '{run.name}'")["details"][0]
    assert details == finished.details
    with pytest.raises(ValidationError, match="saved no complete checkpoint"):   # failed before its first one
        fm.resume(run.name)
    assert fm.get(run.name).status == RunStatus.FAILED


def test_weights_that_hold_nan_fail_the_run_at_its_first_step_saving_and_registering_nothing(
        cluster, tiny_model, chat_data, tmp_path):
    """Weights that are not numbers (a corrupt copy, a bad conversion) give a loss or gradient that is not one: the
    run fails at once saying so -- no checkpoint and no registered model of NaN weights, no retry."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    finished = create(broken, chat_data, training_duration="2ba").wait(timeout=180)
    assert finished.status == RunStatus.FAILED
    assert "TrainingDivergedError: training diverged at step 1 of 2: loss nan" in finished.details
    assert "the starting weights may hold NaN or infinite values" in finished.details
    types = [e.type for e in fm.get_events(finished.name)]
    assert types[-2:] == ["FAILED_EXCEPTION", "FAILED"]
    assert not {"TRAIN_UPDATED", "CHECKPOINT_SAVED", "REQUEUED", "COMPLETED"} & set(types)
    assert fm.get_checkpoints(finished.name) == []


def test_data_named_relative_to_the_drivers_directory_is_found_by_the_run(cluster, tiny_model, chat_data, tmp_path,
                                                                          monkeypatch):
    """The head and its actors work in another directory than a notebook: a relative path that create() checked
    must name the same file when the run reads it."""
    import shutil

    notebook = tmp_path / "notebook"
    (notebook / "data").mkdir(parents=True)
    shutil.copy(chat_data[0], notebook / "data" / "train.jsonl")
    shutil.copy(chat_data[1], notebook / "data" / "eval.jsonl")
    monkeypatch.chdir(notebook)
    run = fm.create(model=str(tiny_model), train_data_path="data/train.jsonl", eval_data_path="./data/eval.jsonl",
                    register_to="main.tests", context_length=128, training_duration="1ba")
    assert run.train_data_path == str(notebook / "data" / "train.jsonl")
    assert run.eval_data_path == str(notebook / "data" / "eval.jsonl")
    finished = run.wait(timeout=180)
    assert finished.status == RunStatus.COMPLETED, finished.details


def test_a_run_trains_on_tool_calls_in_openais_format(cluster, tmp_path):
    """Function-calling data as OpenAI's fine-tuning takes it (tools list, assistant tool_calls with JSON-string
    arguments, tool results), on a model whose chat template writes tools out: checked, packed, trained and
    registered like any chat; the tool-calling turns are among the tokens trained on."""
    from tiny_model import TOOLS_CHATML_TEMPLATE, build_tiny_model

    model = build_tiny_model(tmp_path / "tool-model", chat_template=TOOLS_CHATML_TEMPLATE)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
    data = tmp_path / "tools.jsonl"
    with data.open("w") as out:
        for k, city in enumerate(["paris", "rome", "oslo", "lima"] * 3):
            call = {"id": f"call_{k}", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
            out.write(json.dumps({"tools": [tool], "messages": [
                {"role": "user", "content": f"weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call_{k}", "content": f"{10 + k} degrees"},
                {"role": "assistant", "content": f"it is {10 + k} degrees in {city}."}]}) + "\n")
    arguments = dict(model=str(model), train_data_path=str(data), register_to="main.tools", context_length=512,
                     training_duration="2ba")
    only_answers = data.with_name("answers.jsonl")   # the same records with the tool-calling turns weighted out
    only_answers.write_text("".join(
        json.dumps({**record, "messages": [{**m, "weight": 0} if m.get("tool_calls") else m
                                           for m in record["messages"]]}) + "\n"
        for record in map(json.loads, data.read_text().splitlines())))
    with_calls = fm.estimate(**arguments, probe=False)
    without_calls = fm.estimate(**{**arguments, "train_data_path": str(only_answers)}, probe=False)
    assert with_calls.target_tokens > without_calls.target_tokens > 0
    with pytest.raises(ValidationError, match="leaves nothing to train on: none of its 12 examples has a trained "
                                              "token within its first 64 tokens"):   # the answers come later
        fm.estimate(**{**arguments, "train_data_path": str(only_answers), "context_length": 64}, probe=False)
    run = fm.create(**arguments).wait(timeout=180)
    assert run.status == RunStatus.COMPLETED, run.details
    assert_training_metrics_logged(cluster, run)   # a run without eval data logs its training metrics too


def test_unknown_runs_and_bad_input_are_errors_before_anything_is_queued(cluster, tiny_model, chat_data):
    from ray_finetune.errors import RunNotFoundError, ValidationError

    before = len(event_log.sql("SELECT seq FROM events"))
    with pytest.raises(ValidationError, match="training_duration"):
        create(tiny_model, chat_data, training_duration="forever")
    with pytest.raises(RunNotFoundError, match="Finetuning run nope-abcdef not found"):
        fm.get("nope-abcdef")
    with pytest.raises(ValidationError, match="exactly one"):
        fm.cancel()
    assert len(event_log.sql("SELECT seq FROM events")) == before


def test_a_driver_whose_settings_the_cluster_does_not_use_is_told_before_anything_is_queued(
        cluster, tiny_model, chat_data, tmp_path, monkeypatch):
    """The cluster's runs use the settings it started with. A notebook that later points MLFLOW_TRACKING_URI and
    RAY_FINETUNE_STORAGE elsewhere would otherwise queue a run whose model and checkpoints silently go to the old
    places; settings that agree with the cluster's, set or not, are no reason to refuse."""
    from ray_finetune.errors import ConfigError

    before = len(event_log.sql("SELECT seq FROM events"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:hunter2@mlflow.internal:5000")
    monkeypatch.setenv("RAY_FINETUNE_STORAGE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("RAY_FINETUNE_STOP_GRACE_S", str(cluster.stop_grace_s))   # the cluster's own value
    with pytest.raises(ConfigError) as refused:
        create(tiny_model, chat_data, training_duration="1ba")
    message = str(refused.value)
    assert message.startswith("the cluster's runs use the settings it was started with, not this process's: "
                              f"RAY_FINETUNE_STORAGE={tmp_path / 'elsewhere'} here, {cluster.storage} on the cluster; "
                              "MLFLOW_TRACKING_URI=http://team:***@mlflow.internal:5000 here, "
                              f"{cluster.tracking_uri} on the cluster. Unset them here"), message
    assert "hunter2" not in message and "STOP_GRACE" not in message
    assert len(event_log.sql("SELECT seq FROM events")) == before

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("RAY_FINETUNE_STORAGE", str(cluster.storage))
    queued = create(tiny_model, chat_data, training_duration="1ba")
    assert fm.cancel([queued]) == 1 and fm.get(queued).status == RunStatus.STOPPED
