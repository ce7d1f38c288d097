"""Runs that survive: a killed trainer, a killed scheduler or a killed head node; the resumed run reproduces the
uninterrupted one exactly (per-step losses and final weights, bitwise on CPU), a run that keeps dying ends
FAILED with every attempt's reason, a run whose registration failed is registered by resuming it, and an old
checkpoint the storage will not remove costs a run nothing but a line in its events."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file
from typer.testing import CliRunner

from ray_finetune import events as event_log
from ray_finetune import foundation_model as fm
from ray_finetune import tracking
from ray_finetune.cli import app
from ray_finetune.entities import RunStatus
from ray_finetune.errors import ValidationError
from waiting import wait_until

pytestmark = pytest.mark.cluster
STEPS, EVERY = 400, "80ba"   # long enough that a kill after the first checkpoint lands before the last


def create(tiny_model, chat_data, **overrides):
    arguments = dict(model=str(tiny_model), train_data_path=str(chat_data[0]), register_to="main.resume",
                     learning_rate=1e-3, context_length=128, training_duration=f"{STEPS}ba",
                     checkpoint_interval=EVERY)
    arguments.update(overrides)
    return fm.create(**arguments)


def events_of(name: str, kind: str):
    return [e for e in fm.get_events(name) if e.type == kind]


def losses_by_step(name: str) -> dict[int, float]:
    """The last report of each step (steps re-run after a resume report again)."""
    return {e.payload["step"]: e.payload["loss"] for e in events_of(name, "TRAIN_UPDATED")}


def final_weights(name: str) -> dict:
    folder = Path(fm.get_checkpoints(name)[-1]) / "model"
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_model, chat_data):
    run = create(tiny_model, chat_data).wait(timeout=300)
    assert run.status == RunStatus.COMPLETED, run.details
    return run.name


def kill_trainer_after_first_checkpoint(name: str) -> None:
    wait_until(lambda: events_of(name, "CHECKPOINT_SAVED"), what="a checkpoint")
    pid = events_of(name, "MODEL_INITIALIZED")[-1].payload["pid"]
    os.kill(pid, signal.SIGKILL)


def kill_scheduler_after_first_checkpoint(name: str) -> None:
    wait_until(lambda: events_of(name, "CHECKPOINT_SAVED"), what="a checkpoint")
    from actors import scheduler

    ray.kill(scheduler.get_or_create(), no_restart=False)   # Ray restarts it; it replays the log


def kill_head_after_first_checkpoint(name: str) -> None:
    wait_until(lambda: events_of(name, "CHECKPOINT_SAVED"), what="a checkpoint")
    from ray_finetune import cluster, settings

    for process in cluster.head_processes(cluster.local_head_address(settings.load())):
        process.kill()   # the head crashes: every process of it at once (and no other Ray on this machine)
    ray.shutdown()   # this driver's connection died with the head; the next call starts a new head


@pytest.mark.parametrize("kill", [kill_trainer_after_first_checkpoint, kill_scheduler_after_first_checkpoint,
                                  kill_head_after_first_checkpoint])
def test_a_resumed_run_equals_the_uninterrupted_one(cluster, tiny_model, chat_data, uninterrupted, kill):
    run = create(tiny_model, chat_data)
    kill(run.name)
    finished = fm.get(run.name).wait(timeout=300)
    assert finished.status == RunStatus.COMPLETED, finished.details
    types = [e.type for e in fm.get_events(run.name)]
    assert types.count("REQUEUED") == 1 and types.count("STARTED") == 2
    resumed = events_of(run.name, "MODEL_INITIALIZED")[-1].payload
    # From the newest checkpoint complete when the kill landed, mid-training, not from scratch: the first (step 80),
    # or a later one when training went on while the kill was under way (stopping a head takes seconds, during
    # which a tiny model's steps of ~30 ms go on; seen: 160 steps).
    restart = events_of(run.name, "STARTED")[-1].payload
    every = int(EVERY.removesuffix("ba"))
    assert resumed["resumed_at_step"] in range(every, STEPS, every)
    events = fm.get_events(run.name)
    requeued = [e.type for e in events].index("REQUEUED")
    reported = [e.payload["step"] for e in events[:requeued] if e.type == "CHECKPOINT_SAVED"]
    assert resumed["resumed_at_step"] >= max(reported)   # never older than a checkpoint the first attempt reported
    assert Path(restart["resume_from"]).name.endswith(f"-ba{resumed['resumed_at_step']}")
    assert losses_by_step(run.name) == losses_by_step(uninterrupted)   # exactly, step by step
    ours, theirs = final_weights(run.name), final_weights(uninterrupted)
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_a_killed_evaluator_costs_a_run_nothing(cluster, tiny_model, chat_data, uninterrupted):
    """One evaluator records every run's metrics, and rank 0 waits for them every few seconds. Killed mid-run, Ray
    starts it again, and the calls it had (in flight or sent while it restarted) reach the new process: the run
    trains on without a requeue, and MLflow holds every step's metrics, once."""
    from actors import evaluator

    def slow_call(actor) -> int:   # a call surely in flight when the kill lands
        time.sleep(2)
        return os.getpid()

    run = create(tiny_model, chat_data)
    wait_until(lambda: events_of(run.name, "CHECKPOINT_SAVED"), what="a checkpoint")
    recording = evaluator.get_or_create()
    first = ray.get(recording.__ray_call__.remote(lambda actor: os.getpid()))
    in_flight = recording.__ray_call__.remote(slow_call)
    time.sleep(0.5)
    os.kill(first, signal.SIGKILL)
    assert ray.get(in_flight, timeout=120) != first   # run again by the restarted process
    finished = run.wait(timeout=300)
    assert finished.status == RunStatus.COMPLETED, finished.details
    assert "REQUEUED" not in [e.type for e in fm.get_events(run.name)]
    assert losses_by_step(run.name) == losses_by_step(uninterrupted)
    recorded = tracking.client(cluster).get_metric_history(finished.run_id, "train_loss")
    assert sorted(m.step for m in recorded) == list(range(1, STEPS + 1))   # every step, once


def test_a_stopped_run_resumed_by_its_user_equals_the_uninterrupted_one(cluster, tiny_model, chat_data,
                                                                        uninterrupted):
    run = create(tiny_model, chat_data)
    wait_until(lambda: events_of(run.name, "CHECKPOINT_SAVED"), what="a checkpoint")
    assert fm.cancel([run.name], save_checkpoint=True) == 1   # mid-epoch: a checkpoint at whatever step it was
    stopped = fm.get(run.name)
    assert stopped.status == RunStatus.STOPPED
    last = int(Path(fm.get_checkpoints(run.name)[-1]).name.split("-ba")[1])

    resumed = stopped.resume()
    assert resumed.name == run.name and not resumed.status.is_terminal() and resumed.details is None
    with pytest.raises(ValidationError, match="only a STOPPED or FAILED run can be resumed"):
        fm.resume(run.name)   # already queued again
    finished = resumed.wait(timeout=300)
    assert finished.status == RunStatus.COMPLETED, finished.details
    types = [e.type for e in fm.get_events(run.name)]
    assert types.count("CANCELED") == 1 and types.count("RESUMED") == 1 and types[-1] == "COMPLETED"
    assert events_of(run.name, "MODEL_INITIALIZED")[-1].payload["resumed_at_step"] == last
    assert losses_by_step(run.name) == losses_by_step(uninterrupted)   # exactly, step by step
    ours, theirs = final_weights(run.name), final_weights(uninterrupted)
    assert all((ours[k] == theirs[k]).all() for k in theirs)
    status = event_log.sql(f"SELECT status, details FROM runs WHERE run_name = '{run.name}'")
    assert status["status"].tolist() == ["COMPLETED"] and status["details"].isna().all()
    with pytest.raises(ValidationError, match="it is COMPLETED"):
        fm.resume(run.name)


def test_a_run_whose_data_changed_is_not_continued_on_other_data(cluster, tiny_model, chat_data, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(Path(chat_data[0]).read_text())
    run = create(tiny_model, (data,))
    wait_until(lambda: events_of(run.name, "CHECKPOINT_SAVED"), what="a checkpoint")
    fm.cancel([run.name])
    data.write_text(Path(chat_data[0]).read_text().replace("paris", "lyons"))   # the same size, other content
    shell = CliRunner().invoke(app, ["runs", "resume", run.name, "--wait"], catch_exceptions=False)
    assert shell.exit_code == 1 and f"{run.name}: FAILED" in shell.stdout
    # It follows the new life only: from RESUMED, not the canceled life before it again.
    assert "RESUMED" in shell.stderr and "CANCELED" not in shell.stderr and "TRAIN_STARTED" not in shell.stderr
    finished = fm.get(run.name)
    assert finished.status == RunStatus.FAILED
    assert "training data changed after checkpoint" in finished.details and "custom_weights_path" in finished.details
    since = [e.type for e in fm.get_events(run.name)]
    assert "MODEL_INITIALIZED" not in since[since.index("RESUMED"):]   # refused before any trainer was started


def test_a_run_that_keeps_dying_is_not_retried_forever(cluster, tiny_model, chat_data):
    run = create(tiny_model, chat_data, training_duration="5000ba")
    killed = set()
    for _ in range(3):
        event = wait_until(lambda: [e for e in events_of(run.name, "MODEL_INITIALIZED")
                                    if e.payload["pid"] not in killed], what="a new trainer")[0]
        killed.add(event.payload["pid"])
        os.kill(event.payload["pid"], signal.SIGKILL)
    finished = run.wait(timeout=120)
    assert finished.status == RunStatus.FAILED
    assert finished.details.startswith("gave up after 3 attempts: attempt 1: a worker of this run died")
    assert "attempt 3:" in finished.details
    assert [e.type for e in fm.get_events(run.name)].count("REQUEUED") == 2


def block(run, name: str) -> Path:
    """A plain file where `run` will write the folder `name` of its save folder: every write there fails."""
    blocked = Path(run.save_folder) / run.name / name
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("in the way")
    return blocked


def test_unwritable_checkpoint_storage_fails_the_run_with_a_clear_reason(cluster, tiny_model, chat_data):
    run = create(tiny_model, chat_data, training_duration="2ep", checkpoint_interval="1ep")
    block(run, "checkpoints")   # every checkpoint write fails, as on a broken or full disk
    finished = run.wait(timeout=300)
    assert finished.status == RunStatus.FAILED
    assert finished.details.startswith("CheckpointError: could not write checkpoint ep1-ba")
    assert "earlier checkpoints are intact" in finished.details
    assert "REQUEUED" not in [e.type for e in fm.get_events(run.name)]   # a disk problem is not retried blindly


def test_an_old_checkpoint_the_storage_will_not_remove_is_reported_and_the_run_goes_on(cluster, tiny_model,
                                                                                       chat_data):
    """Retention (removing checkpoints beyond checkpoints_to_keep, and what interrupted attempts left) meets a file
    the storage refuses to delete: the run trains on and completes, and each checkpoint's event names what stays
    and why. A staging folder an interrupted attempt left goes."""
    run = create(tiny_model, chat_data, training_duration="160ba")
    checkpoints = Path(run.save_folder) / run.name / "checkpoints"
    torn = checkpoints / "ep0-ba1" / "model" / "model.safetensors"   # no trainer state: an attempt killed writing
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"x")
    staging = checkpoints / ".tmp-ep0-ba2" / "rank_0.pt"
    staging.parent.mkdir(parents=True)
    staging.write_bytes(b"x")
    if subprocess.run(["chattr", "+i", str(torn)], capture_output=True).returncode:
        fm.cancel([run.name])
        pytest.skip("this file system does not let root make a file undeletable (chattr +i)")
    try:
        finished = run.wait(timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(torn)], check=True)
    assert finished.status == RunStatus.COMPLETED, finished.details
    saved = events_of(run.name, "CHECKPOINT_SAVED")
    assert [e.payload["step"] for e in saved] == [80, 160]
    for event in saved:
        assert event.message.endswith("; retention could not remove ep0-ba1: PermissionError: [Errno 1] Operation "
                                      "not permitted: 'model.safetensors' -- it stays, and the next checkpoint tries "
                                      "again")
        assert event.payload["not_removed"] == ["ep0-ba1: PermissionError: [Errno 1] Operation not permitted: "
                                                "'model.safetensors'"]
    assert torn.exists() and not staging.parent.exists()
    assert fm.get_checkpoints(run.name) == [e.payload["path"] for e in saved]


def test_a_run_whose_registration_failed_is_registered_by_resume_without_training_again(cluster, tiny_model,
                                                                                        chat_data):
    """Training ended and registering did not (here the folder the final model is staged in is taken; a full disk
    or an unreachable registry stops it alike): the run ends FAILED saying why, and resuming it registers its final
    checkpoint without training a step again."""
    run = create(tiny_model, chat_data, training_duration="2ba", checkpoint_interval="1ep")
    blocked = block(run, "final_model.tmp")
    failed = run.wait(timeout=300)
    assert failed.status == RunStatus.FAILED
    assert failed.details.startswith(f"RegistrationError: could not register the final model as "
                                     f"main.resume.{run.name}: FileExistsError: ")
    assert failed.details.endswith("Its final checkpoint (ep0-ba2) is intact: once the cause is fixed, resuming the "
                                   "run (fm.resume, `ray-finetune runs resume`) registers it without training again")
    types = [e.type for e in fm.get_events(run.name)]
    assert "TRAIN_FINISHED" in types and "REQUEUED" not in types
    trained = losses_by_step(run.name)

    blocked.unlink()
    finished = fm.resume(run.name).wait(timeout=300)
    assert finished.status == RunStatus.COMPLETED, finished.details
    assert losses_by_step(run.name) == trained and len(events_of(run.name, "TRAIN_UPDATED")) == len(trained)
    assert events_of(run.name, "MODEL_INITIALIZED")[-1].payload["resumed_at_step"] == 2
    registered = events_of(run.name, "COMPLETED")[-1].payload
    assert registered["model_name"] == f"main.resume.{run.name}" and registered["model_version"] == "1"
