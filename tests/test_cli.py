"""The command line, run the way a user runs it (in-process through Typer's runner, same cluster)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ray_finetune import cli
from ray_finetune.cli import app

pytestmark = pytest.mark.cluster
runner = CliRunner()


def invoke(*arguments: str):
    return runner.invoke(app, list(arguments), catch_exceptions=False)


def test_create_wait_then_inspect_from_the_shell(cluster, tiny_model, chat_data, monkeypatch):
    result = invoke("create", "--model", str(tiny_model), "--train-data-path", str(chat_data[0]),
                    "--register-to", "main.cli", "--training-duration", "3ba", "--context-length", "128",
                    "--learning-rate", "1e-3", "--wait", "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout[result.stdout.index("{"):])
    assert run["status"] == "COMPLETED"
    name = run["name"]

    listed = json.loads(invoke("runs", "list", "--json").stdout)
    assert name in [r["name"] for r in listed]
    got = json.loads(invoke("runs", "get", name, "--json").stdout)
    assert got["status"] == "COMPLETED" and got["training_duration"] == "3ba"
    events = json.loads(invoke("events", name, "--json").stdout)
    assert events[0]["type"] == "CREATED" and events[-1]["type"] == "COMPLETED"
    assert sum(e["type"] == "TRAIN_UPDATED" for e in events) == 3
    checkpoints = json.loads(invoke("checkpoints", name, "--json").stdout)
    assert checkpoints[-1].endswith("ba3")
    rows = json.loads(invoke("sql", f"SELECT status FROM runs WHERE run_name = '{name}'", "--json").stdout)
    assert rows == [{"status": "COMPLETED"}]
    # A field that some events lack is SQL NULL: JSON null for scripts (not NaN, which no JSON parser takes), an
    # empty cell in the table.
    query = (f"SELECT type, (payload->>'loss')::DOUBLE AS loss FROM events WHERE run_name = '{name}' "
             "AND type IN ('CREATED', 'TRAIN_UPDATED') ORDER BY seq")
    rows = json.loads(invoke("sql", query, "--json").stdout)
    assert rows[0] == {"type": "CREATED", "loss": None} and isinstance(rows[1]["loss"], float)
    assert "nan" not in invoke("sql", query).stdout.lower()
    assert "TRAIN_UPDATED" in invoke("events", name).stdout
    assert "COMPLETED" in invoke("events", name, "--follow").stdout
    refused = invoke("runs", "resume", name)
    assert refused.exit_code == 2 and "cannot be resumed: it is COMPLETED" in refused.stderr
    # On a terminal of 80 columns the list keeps every run's whole name and status, and says what it left out.
    monkeypatch.setattr(cli.console, "width", 80)
    listing = invoke("runs", "list").stdout
    row = next(line for line in listing.splitlines() if name in line)
    assert "│ COMPLETED │" in row and "…" not in listing, listing
    # Which columns go depends on the other runs listed (a failed run's details need room): never these two.
    left_out = next(line for line in listing.splitlines() if "left out at this width (80 columns)" in line)
    assert left_out.startswith("model, created_by") and left_out.endswith("--json shows every field"), listing
    monkeypatch.setattr(cli.console, "width", 200)
    listing = invoke("runs", "list").stdout
    assert "left out" not in listing and str(tiny_model) in listing, listing


def test_shell_errors_are_one_line_with_an_exit_code(cluster, tiny_model, chat_data):
    bad = invoke("create", "--model", str(tiny_model), "--train-data-path", str(chat_data[0]),
                 "--register-to", "main", "--context-length", "128")
    assert bad.exit_code == 2 and "register_to" in bad.stderr and "Traceback" not in bad.output
    missing = invoke("runs", "get", "nope-zzzzzz")
    assert missing.exit_code == 1 and "not found" in missing.stderr
    write = invoke("sql", "DELETE FROM events")
    assert write.exit_code == 2 and "read-only" in write.stderr


def test_looking_at_runs_from_a_fresh_process_imports_no_training_code(cluster):
    """`ray-finetune runs list`, `events`, `sql`, `status` and `cancel` only talk to the cluster's actors: a new
    process doing them must not import torch or transformers (seconds of a small machine's time, every command;
    Ray loads the scheduler's class to hand out its handle, so the scheduler's module must not import them)."""
    import subprocess
    import sys

    probe = ("import sys, json\n"
             "from ray_finetune.cli import app\n"
             "from typer.testing import CliRunner\n"
             "for command in (['runs', 'list', '--json'], ['sql', 'SELECT count(*) FROM events', '--json'],\n"
             "                ['status', '--json']):\n"
             "    assert CliRunner().invoke(app, command).exit_code == 0, command\n"
             "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'mlflow') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def invoke_sql_types(run_name: str) -> list[str]:
    query = f"SELECT DISTINCT type FROM events WHERE run_name = '{run_name}'"
    return [row["type"] for row in json.loads(invoke("sql", query, "--json").stdout)]


def test_status_says_which_actors_answer_what_runs_and_what_waits(cluster, tiny_model, chat_data):
    from ray_finetune import foundation_model as fm
    from waiting import wait_until

    arguments = dict(model=str(tiny_model), train_data_path=str(chat_data[0]), register_to="main.cli",
                     context_length=128, training_duration="5000ba")
    first, second = fm.create(**arguments), fm.create(**arguments)   # this head runs one at a time
    try:
        wait_until(lambda: fm.get(first.name).status.value == "RUNNING", what="the first run training")
        shown = invoke("status", "--json")
        assert shown.exit_code == 0, shown.output
        found = json.loads(shown.stdout)
        assert found["healthy"] and found["nodes_alive"] >= 1 and found["total"]["CPU"] > 0
        states = {actor["role"]: actor for actor in found["actors"]}
        assert set(states) == {"scheduler", "event store", "data packer", "evaluator", "registrar"}
        assert all(states[role]["state"] == "answering" and states[role]["pid"] for role in states)
        assert [run["name"] for run in found["running"]] == [first.name] and found["queued"][-1] == second.name
        assert found["storage"] == cluster.storage_location   # and the one node reads the head's identity from it
        assert [node["state"] for node in found["nodes"]] == ["reaches"]
        assert (found["tracking_store"], found["tracking_state"]) == (cluster.tracking_uri, "reaches")
        training = found["running"][0]
        logged = set(invoke_sql_types(first.name))   # what the log held a moment later, internal events too
        assert training["status"] == "RUNNING" and training["last_event"] in logged - {"CREATED", "STARTED"}
        assert 0 <= training["last_event_s_ago"] < 60
        table = invoke("status").stdout
        assert "scheduler" in table and first.name in table and second.name in table and "reaches" in table
    finally:
        fm.cancel([first.name, second.name])


def test_status_against_a_scheduler_of_an_older_version_says_so_instead_of_a_traceback(cluster):
    """A head started before an upgrade runs a scheduler without the storage call: the nodes are "not checked",
    saying why, and the cluster does not pass for healthy."""
    from ray_finetune import health

    class OlderScheduler:   # its handle has no `storage` method: Ray raises AttributeError, as for an old actor
        pass

    location, nodes = health._nodes_storage(OlderScheduler())
    assert location == "" and nodes
    assert {node.state for node in nodes} == {"not checked: the scheduler runs an older ray_finetune (restart the "
                                               "head to check)"}
    assert health._tracking_store(OlderScheduler()) == ("", "not checked: the scheduler runs an older ray_finetune "
                                                            "(restart the head to check)")


def test_a_node_that_does_not_answer_in_time_is_named_and_its_task_stopped(cluster, tmp_path):
    """What `status` and `data cache --clear` ask of every node: a node whose answer does not come in time (a hung
    mount) is named, and the task asked of it is stopped rather than left to pile up, one per question."""
    import time

    from ray_finetune.cluster import on_every_node

    late = tmp_path / "answered-late"

    def hangs(seconds: float) -> str:
        time.sleep(seconds)
        late.write_text("done")
        return "done"

    [answer] = on_every_node(hangs, 5.0, within_s=1.0)
    assert (answer.value, answer.failure) == (None, "no answer within 1 s (a hung mount, or a node too busy to start "
                                                    "a task)")
    [answer] = on_every_node(hangs, 0.0, within_s=30.0)
    assert (answer.value, answer.failure) == ("done", None)
    late.unlink()
    time.sleep(6)
    assert not late.exists()   # the first was stopped, not left to finish


@pytest.mark.parametrize("address", [None, "127.0.0.1:9"])   # none set; set to a port where nothing listens
def test_status_without_a_cluster_says_so_and_starts_none(tmp_path, address):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_FINETUNE_HOME": str(tmp_path)}
    if address:
        env["RAY_ADDRESS"] = address
    done = subprocess.run([sys.executable, "-m", "ray_finetune.cli", "status"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (f"no cluster answers at RAY_ADDRESS={address}" if address else "no cluster is running") in done.stderr
    assert not (tmp_path / "head.json").exists()


def test_a_packed_data_cache_on_an_object_store_out_of_reach_is_one_error_line(tmp_path):
    """`data cache` against an endpoint where nothing listens: what failed and what to set, not the S3 client's
    traceback."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))} | {
        "RAY_FINETUNE_HOME": str(tmp_path), "RAY_FINETUNE_STORAGE": "s3://finetune/team",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_MAX_ATTEMPTS": "1"}
    done = subprocess.run([sys.executable, "-m", "ray_finetune.cli", "data", "cache"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = " ".join(done.stderr.split())
    assert line.startswith("error: could not list s3://finetune/team/packed: EndpointConnectionError: Could not "
                           "connect to the endpoint URL"), line
    assert "Every node needs credentials and an endpoint" in line


def test_create_against_a_tracking_server_that_is_down_is_one_error_line_and_queues_nothing(tiny_model, chat_data,
                                                                                          tmp_path):
    """A cluster started with MLFLOW_TRACKING_URI naming a server that is down: create says so in one line, in
    seconds (MLflow itself retries a refused connection for minutes, then ends in a traceback), and no run is
    left half-created in the log."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))} | {
        "RAY_FINETUNE_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://user:secret@127.0.0.1:9/"}

    def shell(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ray_finetune.cli", *arguments], env=env, capture_output=True,
                              text=True, timeout=300)

    try:
        created = shell("create", "--model", str(tiny_model), "--train-data-path", str(chat_data[0]),
                        "--register-to", "main.untracked", "--training-duration", "1ba")
        assert created.returncode == 1 and "Traceback" not in created.stderr, created.stderr[-3000:]
        line = " ".join(created.stderr.split())
        assert line.startswith("error: the MLflow tracking store at 127.0.0.1:9 (MLFLOW_TRACKING_URI where the "
                               "cluster was started) does not answer: Connection refused. Start it"), line
        assert "secret" not in line
        listed = shell("runs", "list", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr[-3000:]
        status = shell("status", "--json")   # what an operator asks: the head does not reach it, and why
        assert status.returncode == 1, status.stderr[-3000:]
        found = json.loads(status.stdout)
        assert found["tracking_store"] == "http://user:***@127.0.0.1:9/" and not found["healthy"]
        assert found["tracking_state"].startswith("the MLflow tracking store at 127.0.0.1:9 (MLFLOW_TRACKING_URI")
    finally:
        shell("down")


def test_the_packed_data_cache_is_listed_and_cleared_keeping_what_runs_under_way_read(cluster, tiny_model, tmp_path,
                                                                                      monkeypatch):
    """`data cache` lists each packed dataset with its size and the runs under way that read it; `--clear` removes
    the entries no run under way reads (here: only those unused for half a day), saying which the storage refused
    to delete (exit code 1), and a run on removed data packs it again."""
    import os
    import subprocess
    import time

    from ray_finetune import foundation_model as fm
    from ray_finetune.entities import RunStatus
    from tiny_model import write_chat_jsonl
    from waiting import wait_until

    def run_on(data, duration):
        return fm.create(model=str(tiny_model), train_data_path=str(data), register_to="main.cache",
                         training_duration=duration, context_length=128)

    def validated(name):
        return [e.payload for e in fm.get_events(name) if e.type == "DATA_VALIDATED"]

    finished = run_on(write_chat_jsonl(tmp_path / "finished.jsonl", 30), "1ba").wait(timeout=300)
    assert finished.status == RunStatus.COMPLETED
    running = run_on(write_chat_jsonl(tmp_path / "running.jsonl", 31), "5000ba")
    wait_until(lambda: [e for e in fm.get_events(running.name) if e.type == "TRAIN_UPDATED"], 120, "a step")
    finished_entry = validated(finished.name)[0]["packed_data"]
    running_entry = validated(running.name)[0]["packed_data"]
    try:
        listed = {e["key"]: e for e in json.loads(invoke("data", "cache", "--json").stdout)["entries"]}
        assert listed[running_entry]["in_use_by"] == [running.name] and listed[finished_entry]["in_use_by"] == []
        assert listed[finished_entry]["examples"] == 30 and listed[finished_entry]["bytes"] > 0
        day_ago = time.time() - 86400
        for entry in (finished_entry, running_entry):   # as if no run had asked for either since yesterday
            os.utime(cluster.packed_data_dir / entry / "stats.json", (day_ago, day_ago))

        from botocore.exceptions import NoCredentialsError

        from ray_finetune.data import cache

        def without_credentials(*_):   # an object store that does not take this machine's credentials
            raise NoCredentialsError()

        with monkeypatch.context() as patched:
            patched.setattr(cache, "remove", without_credentials)
            table = invoke("data", "cache", "--clear", "--unused-days", "0.5")
        assert table.exit_code == 1 and "Traceback" not in table.output
        assert "NoCredentialsError: Unable to locate credentials" in " ".join(table.stderr.split())
        stats = cluster.packed_data_dir / finished_entry / "stats.json"
        if not subprocess.run(["chattr", "+i", str(stats)], capture_output=True).returncode:
            try:   # the storage refuses to delete it: one line saying so, exit code 1, no traceback
                table = invoke("data", "cache", "--clear", "--unused-days", "0.5")
            finally:
                subprocess.run(["chattr", "-i", str(stats)], check=True)
            assert table.exit_code == 1 and "removed 0," in table.stdout and "Traceback" not in table.output
            assert f"error: could not remove {cluster.packed_data_dir / finished_entry}: PermissionError: [Errno 1] " \
                   "Operation not permitted" in " ".join(table.stderr.split())
            assert stats.exists()
        # what a packer or a removal cut short left (rows, no stats), quiet for a day: listed, and removed too
        import shutil

        cut_short = cluster.packed_data_dir / "cut-short"
        shutil.copytree(cluster.packed_data_dir / running_entry / "rows", cut_short / "rows")
        for path in [cut_short, *cut_short.rglob("*")]:
            os.utime(path, (day_ago, day_ago))
        listed = {e["key"]: e for e in json.loads(invoke("data", "cache", "--json").stdout)["entries"]}
        assert listed["cut-short"]["complete"] is False and listed["cut-short"]["bytes"] > 0
        incomplete = sum(not entry["complete"] for entry in listed.values())   # earlier tests' cut short too
        with monkeypatch.context() as wide:
            wide.setattr(cli.console, "width", 200)
            assert "incomplete (cut short)" in invoke("data", "cache").stdout
        table = invoke("data", "cache", "--clear", "--unused-days", "0.5")
        assert table.exit_code == 0 and f"({incomplete} incomplete)" in table.stdout and "removed 2," in table.stdout, \
            table.output
        assert not (cluster.packed_data_dir / finished_entry).exists() and not cut_short.exists()
        assert (cluster.packed_data_dir / running_entry / "stats.json").exists()   # read by a run under way
    finally:
        fm.cancel([running.name])
    again = run_on(tmp_path / "finished.jsonl", "1ba").wait(timeout=300)
    assert again.status == RunStatus.COMPLETED
    assert validated(again.name)[0]["packed_data"] == finished_entry and not validated(again.name)[0]["cached"]


def test_down_stops_the_head_it_started_and_no_other_ray_on_the_machine(cluster):
    """A machine where a user runs a Ray of their own (`ray start --head`) beside ray_finetune's local head:
    `ray-finetune down` stops every process of ray_finetune's head, and the user's Ray goes on."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import psutil

    from ray_finetune import cluster as cluster_module
    from ray_finetune import foundation_model as fm
    from ray_finetune.ports import free_ports

    def alive(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    ours = cluster_module.local_head_address(cluster)
    assert ours and cluster_module.head_processes(ours)
    port, agent_port, client_port, dashboard_port = free_ports(4)
    theirs = f"127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}   # not our head's token
    started = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=1",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--dashboard-agent-listen-port={agent_port}",
         f"--ray-client-server-port={client_port}", f"--dashboard-port={dashboard_port}"],
        env={**env, **cluster_module.SINGLE_MACHINE}, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        their_gcs = [p for p in cluster_module.head_processes(theirs) if p.name() == "gcs_server"]
        ours_before = cluster_module.head_processes(ours)
        assert len(their_gcs) == 1 and not {p.pid for p in ours_before} & {p.pid for p in
                                                                            cluster_module.head_processes(theirs)}
        result = invoke("down")
        assert result.exit_code == 0 and "stopped the local Ray head" in result.stdout, result.output
        assert not [p for p in ours_before if alive(p)]   # every process of ours, its workers and agents too
        assert cluster_module.local_head_address(cluster) is None
        assert alive(their_gcs[0]) and cluster_module._reachable(theirs)   # theirs goes on
        assert "no local Ray head was running" in invoke("down").stdout
    finally:
        cluster_module.stop_head(theirs)
    # the next call starts a new local head, as after any `down`
    fm.list()
    assert cluster_module.local_head_address(cluster)
