"""Several Ray nodes on this machine, each its own `ray start` process on loopback with token auth: a head (the
control plane, no accelerators) and two worker nodes with one "accelerator" each (a custom resource standing in
for a GPU; trainers ask for it through RAY_FINETUNE_TRAINER_RESOURCES). Drivers run as separate processes, as
users' scripts and submitted Ray jobs do.

- a trainer group spread over two nodes gives the losses of one worker;
- two runs go to the two accelerators; SIGKILL of one worker node's raylet mid-run appends REQUEUED, and that
  run waits for an accelerator, then finishes on the surviving node from its newest checkpoint;
- `ray job submit` against the head's job server runs a driver that creates, follows and finishes a run;
- with RAY_FINETUNE_TRAINER_DEVICE=gpu, a run on a cluster without GPU nodes waits for one (as under an
  autoscaler that starts GPU nodes on demand) instead of training on the head's CPUs;
- with RAY_FINETUNE_STORAGE=s3://..., a run survives the loss of every node's disk; a node whose endpoint leads to
  another object store is named, by the failing run and by `ray-finetune status`; a cancel waits for the
  checkpoint that is going up in the background.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from object_store import s3_server, slow_uploads
from ray_finetune import storage
from ray_finetune.ports import free_port, free_ports

pytestmark = pytest.mark.cluster

TESTS = Path(__file__).parent
DRIVER = TESTS / "multinode_driver.py"
RAY = str(Path(sys.executable).with_name("ray"))


def ray_start(env: dict[str, str], *arguments: str, agent_port: int | None = None) -> None:
    """One node; its agent gets a port of its own (Ray's default, 52365, is taken by any other Ray here)."""
    result = subprocess.run([RAY, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={agent_port or free_port()}", *arguments],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def processes_of(root: Path) -> list[psutil.Process]:
    """Every process of this test's cluster: their command lines name its temp dirs."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(root) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@contextlib.contextmanager
def head_node(**settings: str):
    """A head node (the control plane: one CPU, no accelerators) in a temp dir of its own, with token auth and the
    given RAY_FINETUNE_* settings; every process of the cluster is killed on exit."""
    root = Path(tempfile.mkdtemp(prefix="rfmn-", dir="/tmp"))   # short: Ray's socket paths must fit 107 bytes
    home = root / "home"
    home.mkdir()
    token = home / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port, dashboard_port, client_port, agent_port = free_ports(4)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_FINETUNE_HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_USAGE_STATS_ENABLED="0", **settings)
    try:
        ray_start(env, "--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={root}/head",
                  f"--ray-client-server-port={client_port}", "--include-dashboard=true",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", agent_port=agent_port)
        yield SimpleNamespace(root=root, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                              dashboard=f"http://127.0.0.1:{dashboard_port}",
                              add_node=lambda name, *resources, **node_env: ray_start(
                                  {**env, **node_env}, f"--address=127.0.0.1:{port}", "--num-cpus=2", *resources,
                                  f"--temp-dir={root}/{name}"))
    finally:
        for process in processes_of(root):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def nodes():
    with head_node(RAY_FINETUNE_TRAINER_RESOURCES='{"accelerator": 1}', RAY_FINETUNE_MAX_CONCURRENT_RUNS="2",
                   RAY_FINETUNE_TRAINER_WORKERS="1") as cluster:
        for worker in ("w1", "w2"):
            cluster.add_node(worker, '--resources={"accelerator": 1}')
        yield cluster


def drive(nodes, scenario: str, tiny_model: Path, work: Path) -> dict:
    result = subprocess.run([sys.executable, str(DRIVER), scenario, str(tiny_model), str(work)], env=nodes.env,
                            capture_output=True, text=True, timeout=900, cwd=TESTS.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_trainer_group_across_two_nodes_gives_the_losses_of_one_worker(nodes, tiny_model, tmp_path):
    result = drive(nodes, "span", tiny_model, tmp_path)
    assert len(set(result["nodes_two"])) == 2   # one accelerator per node: the two ranks had to spread
    assert len(result["two"]) == len(result["one"]) > 1
    assert result["two"] == pytest.approx(result["one"], rel=1e-4)


def test_cancelling_an_experiment_stops_its_running_runs_together(nodes, tiny_model, tmp_path):
    """Two runs of one experiment train at once, one per node; cancelling the experiment asks both to stop before
    either has stopped (one after another, the second would train on while the first wrote its checkpoint)."""
    result = drive(nodes, "cancel_experiment", tiny_model, tmp_path)
    assert result["stopped"] == 2
    requested, canceled = [], []
    for run in result["runs"]:
        assert run["status"] == "STOPPED" and run["details"].startswith("canceled by the user; final checkpoint ep")
        requested += [seq for seq, kind in run["events"] if kind == "CANCEL_REQUESTED"]
        canceled += [seq for seq, kind in run["events"] if kind == "CANCELED"]
    assert len(requested) == len(canceled) == 2
    assert max(requested) < min(canceled), result


def test_a_killed_worker_node_requeues_its_run_which_finishes_on_the_other(nodes, tiny_model, tmp_path):
    driver = subprocess.Popen([sys.executable, str(DRIVER), "runs", str(tiny_model), str(tmp_path)],
                              env=nodes.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=TESTS.parent)
    placed = json.loads(driver.stdout.readline())
    assert placed["placed"], "no run reached its first checkpoint"
    victim_run, victim_node = next(iter(placed["placed"].items()))
    victim_dir = Path(placed["sockets"][victim_node]).parents[2]   # <temp dir>/session_*/sockets/plasma_store
    assert victim_dir.parent == nodes.root and victim_dir.name in ("w1", "w2")
    raylets = [p for p in processes_of(victim_dir) if p.name() == "raylet"]
    assert len(raylets) == 1
    raylets[0].send_signal(signal.SIGKILL)

    out, err = driver.communicate(timeout=900)
    assert driver.returncode == 0, err[-4000:]
    # The driver's last JSON line (Ray may print its own lines, such as object-store statistics, after it).
    result = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")][-1]["result"]
    assert {run["status"] for run in result.values()} == {"COMPLETED"}, {
        name: (run["status"], run["details"]) for name, run in result.items()}
    victim = result[victim_run]
    types = [t for _, t in victim["events"]]
    assert "REQUEUED" in types and types.count("PLACED") >= 2
    assert victim["nodes"][0] == [victim_node] and victim_node not in victim["nodes"][-1]
    assert victim["resumed_at"][0] == 0 and victim["resumed_at"][-1] > 0   # from its checkpoint, not from scratch
    head = next(node for node, socket_path in placed["sockets"].items() if f"{nodes.root}/head/" in socket_path)
    for run in result.values():   # trainers only ever ran where an accelerator was: never on the head
        assert all(head not in placement for placement in run["nodes"])


def test_ray_job_submit_runs_a_driver_that_creates_follows_and_finishes_a_run(nodes, tiny_model, tmp_path):
    job_env = {key: nodes.env[key] for key in nodes.env if key.startswith("RAY_FINETUNE_")}
    command = [RAY, "job", "submit", f"--address={nodes.dashboard}",
               f"--runtime-env-json={json.dumps({'env_vars': job_env})}", "--",
               sys.executable, str(DRIVER), "job", str(tiny_model), str(tmp_path)]
    for _ in range(30):   # the job server answers "no available agent" until the head's agent has registered
        submitted = subprocess.run(command, env={k: v for k, v in nodes.env.items() if k != "RAY_ADDRESS"},
                                   capture_output=True, text=True, timeout=600)
        if "No available agent" not in submitted.stdout + submitted.stderr:
            break
        time.sleep(2)
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    line = next(line for line in reversed(submitted.stdout.splitlines()) if line.startswith('{"result"'))
    result = json.loads(line)["result"]
    assert result["status"] == "COMPLETED"
    assert result["events"][0] == "CREATED" and result["events"][-1] == "COMPLETED"


def test_a_run_told_to_train_on_gpus_waits_for_a_gpu_node(tiny_model, tmp_path):
    """cluster.yaml starts GPU nodes only when something asks for GPUs. Here the "GPU node" is a node started with
    --num-gpus=1 (Ray's resource; the training itself runs on this machine's CPU), started only once the run has
    been seen waiting for it, as an autoscaler would."""
    with head_node(RAY_FINETUNE_TRAINER_DEVICE="gpu") as cluster:
        driver = subprocess.Popen([sys.executable, str(DRIVER), "on_demand", str(tiny_model), str(tmp_path)],
                                  env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=TESTS.parent)
        waiting = json.loads(driver.stdout.readline() or "{}")
        if not waiting:
            driver.kill()
            pytest.fail(driver.stderr.read()[-4000:])
        assert waiting["pending_gpus"] == 1, waiting       # the trainer's placement asks for a GPU and waits
        assert "PLACED" not in waiting["events"] and "TRAIN_STARTED" not in waiting["events"]
        assert waiting["waiting"] == ["waiting for the cluster to free or start 1 x (CPU 1, GPU 1) for the "
                                      "trainer group"]      # what an operator reads when a run sits in STARTING
        cluster.add_node("gpu", "--num-gpus=1")
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-4000:]
        result = json.loads(out.strip().splitlines()[-1])["result"]
        assert result["status"] == "COMPLETED"
        gpu_node = next(node for node, socket_path in result["sockets"].items() if f"{cluster.root}/gpu/" in socket_path)
        assert result["placed"] == [[gpu_node]]


def test_a_run_whose_gpus_never_come_fails_saying_what_it_waited_for(tiny_model, tmp_path):
    """No autoscaler here, so the GPU node it waits for never starts: after RAY_FINETUNE_PLACEMENT_TIMEOUT_S the
    run fails with a reason an operator can act on, and leaves no pending GPU request behind (an autoscaler would
    otherwise keep starting nodes for it)."""
    with head_node(RAY_FINETUNE_TRAINER_DEVICE="gpu", RAY_FINETUNE_PLACEMENT_TIMEOUT_S="20") as cluster:
        driver = subprocess.run([sys.executable, str(DRIVER), "on_demand", str(tiny_model), str(tmp_path)],
                                env=cluster.env, capture_output=True, text=True, cwd=TESTS.parent, timeout=600)
        assert driver.returncode == 0, driver.stderr[-4000:]
        lines = [json.loads(line) for line in driver.stdout.strip().splitlines()]
        assert lines[0]["waiting"] and lines[0]["pending_gpus"] == 1   # it waited, and said so, first
        result = lines[-1]["result"]
        assert result["status"] == "FAILED" and result["placed"] == [] and result["pending_gpus"] == 0
        assert result["details"].startswith("PlacementTimeoutError: the cluster did not make room for the trainer "
                                            "group (1 x (CPU 1, GPU 1)) within 20 s; it has CPU 1")
        assert "RAY_FINETUNE_PLACEMENT_TIMEOUT_S=0 waits forever" in result["details"]


def test_a_node_that_reaches_another_object_store_is_named_before_the_run_trains(tiny_model, tmp_path):
    """The trainers' node is started with an endpoint that leads to another S3 (a worker set up with the wrong
    credentials or region, or a shared folder not mounted, looks the same to it): the run fails before it trains,
    naming the node and the setting, and `ray-finetune status` names the node too."""
    with s3_server("finetune") as head_s3, s3_server() as other_s3:
        with head_node(RAY_FINETUNE_STORAGE="s3://finetune/team",
                       RAY_FINETUNE_TRAINER_RESOURCES='{"accelerator": 1}', **head_s3) as cluster:
            cluster.add_node("w1", '--resources={"accelerator": 1}', **other_s3)
            run = drive(cluster, "unreached_storage", tiny_model, tmp_path)["result"]
            status = subprocess.run([sys.executable, "-m", "ray_finetune.cli", "status", "--json"], env=cluster.env,
                                    capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    identity = f"s3://finetune/team/{storage.IDENTITY_FILE}"
    assert run["status"] == "FAILED" and "MODEL_INITIALIZED" not in run["events"]
    assert re.sub(r"node [0-9.]+ ", "node IP ", run["details"]) == (
        "ConfigError: nodes of the trainer group do not reach RAY_FINETUNE_STORAGE=s3://finetune/team as the head "
        f"does: node IP (rank 0): {identity} is not there (on the object store this node's credentials "
        "reach). Every node needs credentials and an endpoint that read and write the same object store (AWS_* "
        "variables or the cloud's instance role, set on each node)")
    assert status.returncode == 1, status.stderr[-3000:]   # not healthy
    shown = json.loads(status.stdout)
    assert shown["storage"] == "s3://finetune/team"
    assert sorted(node["state"] for node in shown["nodes"]) == [
        "reaches", f"{identity} is not there (on the object store this node's credentials reach)"]


def test_a_cancel_waits_for_the_checkpoint_going_up_in_the_background(tiny_model, tmp_path):
    """Object storage far away (each checkpoint file takes seconds to go up) and a cancel's grace of 1 s: a cancel
    that comes while a checkpoint goes up in the background waits for it, so the run stops with that checkpoint
    complete (and resumable), not killed with it half-uploaded."""
    uploading = tmp_path / "uploading"
    with s3_server("finetune") as aws, slow_uploads(aws, "/checkpoints/ep", 4.0, uploading) as far:
        with head_node(RAY_FINETUNE_STORAGE="s3://finetune/team", RAY_FINETUNE_STOP_GRACE_S="1", **far) as cluster:
            cluster.add_node("w1")
            result = subprocess.run([sys.executable, str(DRIVER), "cancel_while_uploading", str(tiny_model),
                                     str(tmp_path)], env={**cluster.env, "TEST_UPLOADING": str(uploading)},
                                    capture_output=True, text=True, timeout=900, cwd=TESTS.parent)
            assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])["result"]
    assert run["status"] == "STOPPED", run
    types = [kind for kind, _ in run["events"]]
    after_cancel = run["events"][types.index("CANCEL_REQUESTED"):]
    saved = [step for kind, step in after_cancel if kind == "CHECKPOINT_SAVED"]
    assert saved, run["events"]   # the checkpoint in flight when the cancel came was completed, then reported
    assert run["checkpoints"][-1].endswith(f"-ba{saved[-1]}") and run["pointer"].endswith(f"-ba{saved[-1]}")
    assert run["complete"]   # its trainer state is in the bucket


def test_object_storage_serves_a_run_whose_nodes_share_no_disk(tiny_model, tmp_path):
    """RAY_FINETUNE_STORAGE=s3://... against a real S3 server (moto's), each node with a mirror of its own: a run of
    two workers on two nodes checkpoints into the bucket, is cancelled at a checkpoint, loses every node's copy of
    everything, resumes from the bucket and is registered from it; a second run starts from the first's weights
    named by their s3:// pointer; once its data is removed from the bucket, `data cache --clear` removes the copies
    the trainers pulled to their nodes."""
    with s3_server("finetune") as aws:
        with head_node(RAY_FINETUNE_STORAGE="s3://finetune/team", RAY_FINETUNE_TRAINER_WORKERS="2",
                       RAY_FINETUNE_ZERO_STAGE="2",   # each rank writes its own optimizer shard
                       RAY_FINETUNE_TRAINER_RESOURCES='{"accelerator": 1}', **aws) as cluster:
            mirrors = [cluster.root / "home" / "mirror"]   # the head's (and the driver's): the default
            for name in ("w1", "w2"):
                mirrors.append(cluster.root / f"{name}-mirror")
                cluster.add_node(name, '--resources={"accelerator": 1}', RAY_FINETUNE_MIRROR=str(mirrors[-1]))
            result = subprocess.run(
                [sys.executable, str(DRIVER), "object_storage", str(tiny_model), str(tmp_path)],
                env={**cluster.env, "TEST_MIRRORS": ",".join(map(str, mirrors))}, capture_output=True, text=True,
                timeout=1200, cwd=TESTS.parent)
            assert result.returncode == 0, result.stderr[-4000:]
            local_storage = cluster.root / "home" / "storage"
            assert not local_storage.exists() or not any(local_storage.rglob("*"))   # nothing went to local disk
    run = json.loads(result.stdout.strip().splitlines()[-1])["result"]
    assert (run["stopped"], run["status"], run["details"]) == ("STOPPED", "COMPLETED", None), run
    assert run["save_folder"].startswith("s3://finetune/team/mlflow-artifacts/")
    assert all(path.startswith(run["save_folder"]) for path in run["checkpoints"])
    assert len(set(run["nodes"][-1])) == 2            # its two workers on the two worker nodes
    assert run["resumed_at"][0] == 0 and run["resumed_at"][-1] > 0   # from the bucket's checkpoint
    stored = run["stored"]
    final = run["checkpoints"][-1].rsplit("/", 1)[-1]
    assert {path.split("/")[1] for path in stored if path.startswith("checkpoints/ep")} == {final}   # kept 1
    assert f"checkpoints/{final}/trainer_state.json" in stored
    assert f"checkpoints/{final}/model/model.safetensors" in stored
    assert "checkpoints/latest-sharded-rank0.symlink" in stored and "final_model/config.json" in stored
    shards = [path for path in stored if path.startswith(f"checkpoints/{final}/") and "rank_1" in path]
    assert shards, stored                            # the second node's rank pushed its own shards
    assert not [path for path in stored if ".tmp" in path]
    assert run["left_in_mirrors"] == []   # a node keeps a checkpoint or final model only while it writes or reads it
    assert len(run["models_logged"]) == 2            # both runs' registered models, as MLflow logged them
    assert run["follower"] == "COMPLETED", run["follower_details"]
    assert run["follower_weights"][0].startswith(run["save_folder"])
    cleared = run["cleared"]   # the data removed from the bucket: every node's copy of it goes with `--clear`
    assert cleared["exit_code"] == 0, cleared["errors"]
    nodes = json.loads(cleared["output"])["nodes"]
    assert len(nodes) == 3 and all(n["not_cleared"] is None for n in nodes) and sum(n["freed_bytes"] for n in nodes)
    removed = [c for c in cleared["copies_before"] if c.endswith(cleared["key"])]
    assert len(removed) >= 2 and not set(removed) & set(cleared["copies_after"])   # both trainer nodes had pulled it
    assert set(cleared["copies_after"]) == set(cleared["copies_before"]) - set(removed)   # the eval data's stay
