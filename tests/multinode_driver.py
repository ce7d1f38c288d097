"""A driver for the multi-node tests: run in its own process against a cluster of several `ray start` nodes
(RAY_ADDRESS, token and settings come from the environment), as a user's script or a submitted Ray job would.

    python multinode_driver.py span TINY_MODEL WORK   # trainer group across nodes vs one worker: losses
    python multinode_driver.py runs TINY_MODEL WORK   # two runs through fm.create; prints where they are placed
                                                      # then waits for both to end (the test kills a node meanwhile)
    python multinode_driver.py cancel_experiment TINY_MODEL WORK  # two runs of one experiment, cancelled together
                                                                  # with final checkpoints once both train
    python multinode_driver.py job TINY_MODEL WORK    # one run created, followed and finished (as a Ray job)
    python multinode_driver.py on_demand TINY_MODEL WORK  # one run; prints once its trainers wait for a GPU (the
                                                          # test then starts a GPU node, or not), then waits for
                                                          # its end
    python multinode_driver.py object_storage TINY_MODEL WORK  # with RAY_FINETUNE_STORAGE=s3://...: one run across
                                                               # two nodes, cancelled with a checkpoint, every node's
                                                               # mirror (TEST_MIRRORS) removed, resumed to the end;
                                                               # then a run from its checkpoint's weights; then
                                                               # its data removed from the bucket and `data cache
                                                               # --clear` run
    python multinode_driver.py unreached_storage TINY_MODEL WORK  # one run, to its end (its trainers' node does
                                                                  # not reach the head's storage)
    python multinode_driver.py cancel_while_uploading TINY_MODEL WORK  # one run, cancelled once a checkpoint
                                                                       # is going up (the file TEST_UPLOADING)

Each prints JSON lines on stdout; the last one is the result.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))


def say(**values) -> None:
    print(json.dumps(values), flush=True)


def span(model: str, work: Path) -> None:
    from ray_finetune import cluster
    from trainer_helpers import TWO_ROW_BATCHES, packed_chat_run, train_with

    settings = cluster.connect()
    rows, stats, spec = packed_chat_run(model, work, TWO_ROW_BATCHES)
    resources = settings.trainer_resources
    one, _, nodes_one = train_with(1, rows, stats, spec, settings, work, resources, "-span")
    two, _, nodes_two = train_with(2, rows, stats, spec, settings, work, resources, "-span")
    say(one=one, two=two, nodes_one=nodes_one, nodes_two=nodes_two)


def node_sockets() -> dict[str, str]:
    """Ray node id → its object store socket, whose path names the node's temp dir (how the test tells nodes
    that share one IP apart)."""
    import ray

    return {node["NodeID"]: node["ObjectStoreSocketName"] for node in ray.nodes() if node["Alive"]}


def log(run_name: str) -> list:
    """Every event of a run as the log holds it (internal ones such as PLACED included)."""
    import ray

    from actors.event_sink import event_store

    return ray.get(event_store().events.remote(run_name=run_name))


def runs(model: str, work: Path) -> None:
    from ray_finetune import foundation_model as fm
    from tiny_model import write_chat_jsonl

    data = write_chat_jsonl(work / "runs.jsonl", 48)
    created = [fm.create(model=model, train_data_path=str(data), register_to=f"main.tests.multinode{i}",
                         training_duration="6ep", context_length=64, learning_rate=1e-3,
                         checkpoint_interval="1ep") for i in range(2)]
    placed: dict[str, str] = {}
    deadline = time.time() + 300
    while len(placed) < 1 and time.time() < deadline:   # the test kills a node as soon as one run trains there
        for run in created:
            events = log(run.name)
            if any(e.type == "CHECKPOINT_SAVED" for e in events):
                placed[run.name] = [e for e in events if e.type == "PLACED"][-1].payload["nodes"][0]
        time.sleep(0.5)
    say(placed=placed, sockets=node_sockets())
    finished = [run.wait(timeout=900) for run in created]
    say(result={run.name: {"status": run.status.value, "details": run.details,
                           "events": [(e.seq, e.type) for e in log(run.name)],
                           "nodes": [e.payload["nodes"] for e in log(run.name) if e.type == "PLACED"],
                           "resumed_at": [e.payload["resumed_at_step"] for e in log(run.name)
                                          if e.type == "MODEL_INITIALIZED"]}
                for run in finished})


def cancel_experiment(model: str, work: Path) -> None:
    from ray_finetune import foundation_model as fm
    from tiny_model import write_chat_jsonl

    data = write_chat_jsonl(work / "sweep.jsonl", 24)
    created = [fm.create(model=model, train_data_path=str(data), register_to=f"main.tests.sweep{i}",
                         training_duration="5000ba", context_length=64, experiment_path="/sweeps/cancelled")
               for i in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and not all(
            any(e.type == "TRAIN_UPDATED" for e in log(run.name)) for run in created):
        time.sleep(0.5)
    stopped = fm.cancel(experiment_id=created[0].experiment_id, save_checkpoint=True)
    say(stopped=stopped, runs=[{"status": fm.get(run).status.value, "details": fm.get(run).details,
                                "events": [(e.seq, e.type) for e in log(run.name)]} for run in created])


def job(model: str, work: Path) -> None:
    from ray_finetune import foundation_model as fm
    from tiny_model import write_chat_jsonl

    data = write_chat_jsonl(work / "job.jsonl", 24)
    run = fm.create(model=model, train_data_path=str(data), register_to="main.tests.from_a_job",
                    training_duration="1ep", context_length=64)
    seen = [event.type for event in fm.get_events(run, follow=True)]
    say(result={"name": run.name, "status": fm.get(run).status.value, "events": seen})


def on_demand(model: str, work: Path) -> None:
    from ray.util import placement_group_table

    from ray_finetune import foundation_model as fm
    from tiny_model import write_chat_jsonl

    def pending() -> float:
        """GPUs the cluster's placements wait for."""
        return sum(bundle.get("GPU", 0) for group in placement_group_table().values()
                   if group["state"] == "PENDING" for bundle in group["bundles"].values())

    data = write_chat_jsonl(work / "on_demand.jsonl", 24)
    run = fm.create(model=model, train_data_path=str(data), register_to="main.tests.on_demand",
                    training_duration="1ep", context_length=64)
    pending_gpus, types, deadline = 0, [], time.time() + 300
    # Until the trainers' placement waits for a GPU and the log says so (or, wrongly, they were placed anyway).
    while time.time() < deadline and not (pending_gpus and "WAITING_FOR_RESOURCES" in types) and not (
            {"PLACED", "FAILED"} & set(types)):
        pending_gpus = pending()
        types = [e.type for e in log(run.name)]
        time.sleep(0.5)
    say(pending_gpus=pending_gpus, events=types,
        waiting=[e.message for e in log(run.name) if e.type == "WAITING_FOR_RESOURCES"])
    finished = run.wait(timeout=600)
    say(result={"status": finished.status.value, "details": finished.details, "sockets": node_sockets(),
                "placed": [e.payload["nodes"] for e in log(run.name) if e.type == "PLACED"],
                "pending_gpus": pending()})


def object_storage(model: str, work: Path) -> None:
    import os
    import re
    import shutil

    import fsspec
    import mlflow

    from ray_finetune import foundation_model as fm
    from ray_finetune import settings
    from tiny_model import write_chat_jsonl
    from trainer_helpers import TWO_ROW_BATCHES

    data = write_chat_jsonl(work / "s3.jsonl", TWO_ROW_BATCHES)   # two rows a step: one for each node's worker
    evaluation = write_chat_jsonl(work / "s3-eval.jsonl", 8)
    run = fm.create(model=model, train_data_path=str(data), eval_data_path=str(evaluation),
                    register_to="main.tests.on_s3", training_duration="6ep", context_length=64, learning_rate=1e-3,
                    checkpoint_interval="25ba", checkpoints_to_keep=1)
    deadline = time.time() + 300
    while time.time() < deadline and not any(e.type == "TRAIN_UPDATED" for e in log(run.name)):
        time.sleep(0.2)
    fm.cancel(run, save_checkpoint=True)
    stopped = run.wait(timeout=300).status.value   # wait() refreshes `run` in place
    stopped_checkpoints = fm.get_checkpoints(run)
    for mirror in os.environ["TEST_MIRRORS"].split(","):   # nothing of the run is left on any node's disk
        shutil.rmtree(mirror, ignore_errors=True)
    fm.resume(run)
    finished = run.wait(timeout=600)
    bucket = fsspec.filesystem("s3")
    folder = f"{finished.save_folder}/{finished.name}"
    stored = sorted(path[len(folder.partition("://")[2]) + 1:] for path in bucket.find(folder))
    # (DeepSpeed also leaves its zero_to_fp32.py script beside the checkpoints: not a checkpoint's file)
    left_in_mirrors = [str(path) for mirror in os.environ["TEST_MIRRORS"].split(",") for path in Path(mirror).rglob("*")
                       if path.is_file() and any(part == "final_model" or re.fullmatch(r"(\.tmp-)?ep\d+-ba\d+", part)
                                                 for part in path.parts)]
    mlflow.set_tracking_uri(settings.load().tracking_uri)
    registered = mlflow.MlflowClient().get_model_version("main.tests.on_s3", "1")
    pointer = f"{folder}/checkpoints/latest-sharded-rank0.symlink"
    follower = fm.create(model=model, train_data_path=str(data), register_to="main.tests.from_s3_weights",
                         training_duration="1ba", context_length=64, custom_weights_path=pointer).wait(timeout=600)
    cleared = clear_removed_entry_from_nodes([e.payload["packed_data"] for e in log(run.name)
                                              if e.type == "DATA_VALIDATED"][-1])
    say(result={"cleared": cleared,
        "models_logged": [path for path in bucket.find("finetune") if path.endswith("/MLmodel")],
        "stopped": stopped, "left_in_mirrors": left_in_mirrors, "status": finished.status.value, "details": finished.details,
        "save_folder": finished.save_folder, "stopped_checkpoints": stopped_checkpoints,
        "checkpoints": fm.get_checkpoints(run), "stored": stored, "model_source": registered.source,
        "nodes": [e.payload["nodes"] for e in log(run.name) if e.type == "PLACED"],
        "resumed_at": [e.payload["resumed_at_step"] for e in log(run.name) if e.type == "MODEL_INITIALIZED"],
        "follower": follower.status.value, "follower_details": follower.details,
        "follower_weights": [e.payload["weights_from"] for e in log(follower.name) if e.type == "MODEL_INITIALIZED"],
    })


def clear_removed_entry_from_nodes(key: str) -> dict:
    """The run's packed training data removed from the bucket (as `data cache --clear` removes an idle entry), the
    nodes' copies aged an hour (as if pulled then); then `data cache --clear`: every node drops its copy of it, and
    keeps its copies of what the bucket still holds."""
    import os

    from typer.testing import CliRunner

    from ray_finetune import settings
    from ray_finetune.cli import app
    from ray_finetune.data import cache

    cache_dir = settings.load().packed_data_dir
    [entry] = [e for e in cache.entries(cache_dir) if e.key == key]
    cache.remove(cache_dir, entry)
    hour_ago = time.time() - 3600
    copies = [folder for mirror in os.environ["TEST_MIRRORS"].split(",") for folder in Path(mirror).rglob("packed/*")]
    for folder in copies:
        os.utime(folder, (hour_ago, hour_ago))
    shell = CliRunner().invoke(app, ["data", "cache", "--clear", "--json"], catch_exceptions=False)
    return {"exit_code": shell.exit_code, "output": shell.stdout, "errors": shell.stderr, "key": key,
            "copies_before": sorted(str(folder) for folder in copies),
            "copies_after": sorted(str(folder) for folder in copies if folder.exists())}


def unreached_storage(model: str, work: Path) -> None:
    from ray_finetune import foundation_model as fm
    from tiny_model import write_chat_jsonl

    data = write_chat_jsonl(work / "unreached.jsonl", 24)
    run = fm.create(model=model, train_data_path=str(data), register_to="main.tests.unreached",
                    training_duration="1ep", context_length=64).wait(timeout=600)
    say(result={"status": run.status.value, "details": run.details, "events": [e.type for e in log(run.name)]})


def cancel_while_uploading(model: str, work: Path) -> None:
    import os

    from ray_finetune import foundation_model as fm
    from ray_finetune import storage
    from ray_finetune.train import checkpoint
    from tiny_model import write_chat_jsonl

    data = write_chat_jsonl(work / "far.jsonl", 24)
    run = fm.create(model=model, train_data_path=str(data), register_to="main.tests.far", context_length=64,
                    training_duration="5000ba", checkpoint_interval="50ba")
    uploading, deadline = Path(os.environ["TEST_UPLOADING"]), time.time() + 300
    while time.time() < deadline and not uploading.exists():
        time.sleep(0.1)
    fm.cancel(run)
    run.wait(timeout=300)
    folder = checkpoint.checkpoints_dir(run.save_folder, run.name)
    newest = checkpoint.latest_complete(folder)
    say(result={"status": run.status.value, "details": run.details,
                "events": [(e.type, e.payload.get("step")) for e in log(run.name)],
                "checkpoints": fm.get_checkpoints(run),
                "pointer": storage.read_text(folder / checkpoint.POINTER_NAME).strip() if newest else None,
                "complete": newest is not None})


if __name__ == "__main__":
    scenario, model, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    {"span": span, "runs": runs, "cancel_experiment": cancel_experiment, "job": job, "on_demand": on_demand,
     "object_storage": object_storage, "unreached_storage": unreached_storage,
     "cancel_while_uploading": cancel_while_uploading}[scenario](model, work)
