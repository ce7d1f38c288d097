"""The dry run: estimate() validates, counts and times without queueing, and the run's own events agree."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ray_finetune import events as event_log
from ray_finetune import foundation_model as fm
from ray_finetune.cli import app
from ray_finetune.entities import RunStatus
from ray_finetune.errors import ValidationError

pytestmark = pytest.mark.cluster


def test_the_estimate_matches_what_the_run_reports(cluster, tiny_model, chat_data):
    arguments = dict(model=str(tiny_model), train_data_path=str(chat_data[0]), register_to="main.estimate",
                     training_duration="3ep", context_length=128, eval_data_path=str(chat_data[1]))
    before = len(event_log.sql("SELECT seq FROM events"))
    told: list[str] = []
    estimate = fm.estimate(**arguments, progress=told.append)
    assert told[-1] == "probing a training step"
    assert len(event_log.sql("SELECT seq FROM events")) == before   # nothing queued
    assert estimate.examples == 24 and estimate.truncated_examples == 0
    assert 0 < estimate.target_tokens < estimate.tokens <= estimate.rows * 128
    assert estimate.total_steps == 3 * estimate.steps_per_epoch
    assert estimate.seconds_per_step > 0 and estimate.estimated_seconds == pytest.approx(
        estimate.seconds_per_step * estimate.total_steps)
    assert sum(estimate.length_histogram.values()) == 24 and estimate.eval["examples"] == 6

    run = fm.create(**arguments).wait(timeout=300)
    assert run.status == RunStatus.COMPLETED, run.details
    validated = next(e for e in fm.get_events(run.name) if e.type == "DATA_VALIDATED")
    assert validated.payload["cached"] is True   # the estimate already packed it
    for key in ("examples", "tokens", "target_tokens", "rows", "truncated_examples", "packing_efficiency"):
        assert validated.payload["train"][key] == getattr(estimate, key)
    started = next(e for e in fm.get_events(run.name) if e.type == "TRAIN_STARTED")
    assert started.payload["plan"]["total_steps"] == estimate.total_steps
    assert started.payload["plan"]["global_batch_rows"] == estimate.global_batch_rows
    # the memory a CPU trainer needs, as the dry run and the trainer work it out (train/memory.py)
    initialized = next(e for e in fm.get_events(run.name) if e.type == "MODEL_INITIALIZED")
    assert estimate.memory["activation_checkpointing"] is False and estimate.memory["needed_gb"] > 0
    for key in ("needed_gb", "model_state_gb", "activations_gb"):
        assert initialized.payload["memory"][key] == estimate.memory[key]
    assert f", needs ~{estimate.memory['needed_gb']:g} of " in initialized.message   # what `--wait` prints
    assert f"memory per trainer  {estimate.memory['needed_gb']:g} GiB" in str(estimate)


def test_with_a_cluster_up_the_dry_run_tokenizes_across_it_and_counts_the_same(cluster, tiny_model, tmp_path,
                                                                               monkeypatch):
    from ray_finetune.data import sources
    from ray_finetune.data.prepare import prepare
    from ray_finetune.train.models import load_tokenizer
    from tiny_model import write_chat_jsonl

    monkeypatch.setattr(sources, "MIN_SHARD_BYTES", 1024)   # cut this small file as a big one would be cut
    data = write_chat_jsonl(tmp_path / "fresh.jsonl", 200)   # not in the cache yet
    told: list[str] = []
    estimate = fm.estimate(model=str(tiny_model), train_data_path=str(data), context_length=128, probe=False,
                           progress=told.append)
    assert estimate.tokenized.endswith("shard(s) as Ray tasks across the cluster")
    shards = int(estimate.tokenized.split()[1])
    assert shards > 1
    assert told == [f"tokenizing train_data_path: {done} of {shards} shards" for done in range(shards + 1)]
    alone = prepare("train_data_path", str(data), task_type="CHAT_COMPLETION", model_path=str(tiny_model),
                    tokenizer=load_tokenizer(tiny_model), context_length=128, cache_dir=tmp_path / "alone")
    assert alone.shards == 1 and alone.stats["rows"] == estimate.rows and alone.stats["tokens"] == estimate.tokens
    assert alone.stats["target_tokens"] == estimate.target_tokens
    again = fm.estimate(model=str(tiny_model), train_data_path=str(data), context_length=128, probe=False)
    assert again.tokenized.startswith("from the cache") and "tokenized           from the cache" in str(again)


def test_a_dry_run_pointed_at_a_cluster_that_is_down_runs_in_its_own_process(tiny_model, chat_data, tmp_path):
    import os
    import subprocess
    import sys

    script = ("import sys; from ray_finetune import foundation_model as fm; "
              "print(fm.estimate(model=sys.argv[1], train_data_path=sys.argv[2], context_length=128).tokenized)")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "RAY_FINETUNE_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model), str(chat_data[0])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "in 1 shard(s) in this process"


def test_a_model_too_large_for_this_machine_is_counted_but_not_probed(tiny_model, chat_data, monkeypatch):
    """A run's model may be far larger than the machine the dry run runs on (a laptop planning a GPU cluster's run):
    then the data is still counted and planned, and the time is unknown, with the reason."""
    from ray_finetune import estimate as estimating

    monkeypatch.setattr(estimating, "_free_memory", lambda device: 100_000)   # bytes: less than the tiny model needs
    result = fm.estimate(model=str(tiny_model), train_data_path=str(chat_data[0]), context_length=128)
    assert result.examples == 24 and result.total_steps > 0 and not result.probed
    assert result.seconds_per_step == result.estimated_seconds == 0
    assert "not probed: the model's weights and gradients (0.0 GiB) would not fit" in result.probe_device
    assert "estimated training  unknown" in str(result)


def test_a_run_that_would_not_fit_this_machines_memory_is_told_so_by_the_dry_run(tiny_model, chat_data,
                                                                                monkeypatch):
    monkeypatch.setenv("RAY_FINETUNE_CPU_MEMORY_GB", "0.001")
    result = fm.estimate(model=str(tiny_model), train_data_path=str(chat_data[0]), context_length=128)
    assert result.examples == 24 and not result.probed
    assert result.probe_device == "not probed: the run would not fit in this machine's memory"
    assert result.memory["refused"].startswith("training needs about")
    assert "(RAY_FINETUNE_CPU_MEMORY_GB=0.001)" in result.memory["refused"]
    assert "memory per trainer  does not fit: training needs about" in str(result)


def test_a_model_the_memory_probe_cannot_run_is_still_estimated_and_says_why(tiny_model, chat_data, monkeypatch):
    from ray_finetune.train import loop

    def unprobeable(*arguments, **options):
        raise RuntimeError("this model's forward pass wants something the probe does not give")

    monkeypatch.setattr(loop, "_cpu_need", unprobeable)
    result = fm.estimate(model=str(tiny_model), train_data_path=str(chat_data[0]), context_length=128)
    assert result.probed and result.memory["activation_checkpointing"] is False
    assert result.memory["unknown"].startswith("the probe failed (RuntimeError: this model's forward pass")
    assert "memory per trainer  unknown: the probe failed" in str(result)


def test_estimate_rejects_bad_input_like_create(tiny_model, chat_data):
    with pytest.raises(ValidationError, match="training_duration"):
        fm.estimate(model=str(tiny_model), train_data_path=str(chat_data[0]), training_duration="a while")


def test_estimate_and_data_check_from_the_shell(tiny_model, chat_data):
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "--model", str(tiny_model), "--train-data-path", str(chat_data[0]),
                                 "--register-to", "main.cli", "--context-length", "128", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["examples"] == 24
    assert "Loading weights" not in result.stderr   # the probe's model load draws no bar through the spinner
    checked = runner.invoke(app, ["data", "check", str(chat_data[0])])
    assert checked.exit_code == 0 and checked.stdout == f"{chat_data[0]}: 24 records, all valid for CHAT_COMPLETION\n"
    bad = runner.invoke(app, ["data", "check", str(chat_data[0]), "--task-type", "INSTRUCTION_FINETUNE"])
    assert bad.exit_code == 2 and "24 of 24 records are malformed" in bad.stderr


def test_assistant_turns_with_weight_0_are_read_but_not_trained_on(tiny_model, tmp_path):
    """OpenAI-format data with per-turn weights: leaving out the first answer of every conversation, then the
    second, trains on complementary tokens that add up to the unweighted count; the rows are the same."""
    conversations = [[{"role": "user", "content": f"what is {k} plus {k}?"},
                      {"role": "assistant", "content": f"{2 * k}."},
                      {"role": "user", "content": "are you sure?"},
                      {"role": "assistant", "content": f"yes, {k} plus {k} is {2 * k}."}] for k in range(30)]

    def data(name: str, weights: tuple[int | None, int | None]) -> str:
        path = tmp_path / f"{name}.jsonl"
        with path.open("w") as out:
            for messages in conversations:
                weighted = [dict(m) for m in messages]
                for message, weight in zip(weighted[1::2], weights):
                    if weight is not None:
                        message["weight"] = weight
                out.write(json.dumps({"messages": weighted}) + "\n")
        return str(path)

    def estimate(path: str):
        return fm.estimate(model=str(tiny_model), train_data_path=path, context_length=128, probe=False)

    unweighted, all_ones = estimate(data("plain", (None, None))), estimate(data("ones", (1, 1)))
    first_out, second_out = estimate(data("first-out", (0, 1))), estimate(data("second-out", (1, 0)))
    assert all_ones.target_tokens == unweighted.target_tokens
    assert 0 < first_out.target_tokens < unweighted.target_tokens
    assert first_out.target_tokens + second_out.target_tokens == unweighted.target_tokens
    assert first_out.tokens == second_out.tokens == unweighted.tokens and first_out.dropped_examples == 0

    runner = CliRunner()
    shell = runner.invoke(app, ["estimate", "--model", str(tiny_model), "--train-data-path", data("first-out", (0, 1)),
                                "--context-length", "128", "--json"])
    assert shell.exit_code == 0, shell.output
    assert json.loads(shell.stdout[shell.stdout.index("{"):])["target_tokens"] == first_out.target_tokens
    refused = runner.invoke(app, ["data", "check", data("all-out", (0, 0))])
    assert refused.exit_code == 2 and "every assistant message has weight 0" in refused.stderr


def test_a_dry_run_for_the_clusters_gpus_is_not_timed_on_this_machines_cpu(tiny_model, chat_data, monkeypatch):
    """Planning a GPU cluster's run from a notebook without a GPU: a CPU's step time would be off by orders of
    magnitude, so with no GPU of the cluster free the time is unknown, and says why."""
    from ray_finetune import estimate as estimating

    monkeypatch.setattr(estimating, "_cluster_gpus", lambda: 8)
    result = fm.estimate(model=str(tiny_model), train_data_path=str(chat_data[0]), context_length=128)
    assert result.world_size == 8 and result.examples == 24 and not result.probed
    assert result.probe_device == ("not probed: the run trains on GPUs, this machine has none, and no GPU of the "
                                   "cluster is free now")


GPU_CLUSTER_ESTIMATE = """
import sys, ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)   # a cluster with a (pretend) GPU
from ray_finetune import foundation_model as fm
told = []
result = fm.estimate(model=sys.argv[1], train_data_path=sys.argv[2], context_length=128, progress=told.append)
print(told[-1]); print(result.probe_device); print(result.seconds_per_step)
from ray_finetune import estimate as estimating
def unreachable(*arguments):   # as on a GPU node that does not mount the storage the data was packed to
    raise FileNotFoundError("/mnt/storage/packed/rows: no such file or directory")
estimating._probe_on_a_cluster_gpu = unreachable
# right after the first probe: Ray counts its GPU as taken for a moment after it ended (estimate.FREE_GPU_GRACE_S)
print(fm.estimate(model=sys.argv[1], train_data_path=sys.argv[2], context_length=128).probe_device)
"""


def test_a_dry_run_from_a_machine_without_a_gpu_times_the_step_on_a_free_gpu_of_the_cluster(tiny_model, chat_data,
                                                                                          tmp_path):
    """The probe runs as a Ray task that takes a GPU. (The GPU here is Ray's resource only: the task finds no CUDA
    and times the CPU of that node, which is this machine; on a real cluster it times the GPU.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_FINETUNE_HOME"] = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-c", GPU_CLUSTER_ESTIMATE, str(tiny_model), str(chat_data[0])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    told, device, seconds, failed = done.stdout.strip().splitlines()[-4:]
    assert told == "probing a training step on a GPU of the cluster"
    assert device.endswith(", a GPU node of the cluster") and float(seconds) > 0
    # a probe that fails there leaves the time unknown, saying why, rather than failing the dry run
    assert failed == ("not probed: the probe failed on a GPU node of the cluster (FileNotFoundError: "
                      "/mnt/storage/packed/rows: no such file or directory)")
