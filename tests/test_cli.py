"""The command line, run the way a user runs it (in-process through Typer's runner, same cluster)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ray_finetune.cli import app

pytestmark = pytest.mark.cluster
runner = CliRunner()


def invoke(*arguments: str):
    return runner.invoke(app, list(arguments), catch_exceptions=False)


def test_create_wait_then_inspect_from_the_shell(cluster, tiny_model, chat_data):
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
        training = found["running"][0]
        logged = set(invoke_sql_types(first.name))   # what the log held a moment later, internal events too
        assert training["status"] == "RUNNING" and training["last_event"] in logged - {"CREATED", "STARTED"}
        assert 0 <= training["last_event_s_ago"] < 60
        table = invoke("status").stdout
        assert "scheduler" in table and first.name in table and second.name in table
    finally:
        fm.cancel([first.name, second.name])


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
