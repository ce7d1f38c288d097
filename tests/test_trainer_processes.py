"""The training loop run as its trainer workers run it (one process per rank, one gloo group), without Ray:
a checkpoint written by two workers resumes on one with the losses the run would have had, under ZeRO-0 (the CPU
default), ZeRO-2 (the GPU default), ZeRO-3 and bf16's ZeRO-1 (the CPU's bf16 default; the per-rank state of the
last three converted to be re-sharded); ZeRO-3 trains
and saves what ZeRO-0 does; a bf16 run's checkpoint holds its fp32 master weights, not their bf16 rounding; and CPU
trainers on one machine share its memory budget."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
from pathlib import Path

import fsspec
import pytest

from ray_finetune import storage
from ray_finetune.errors import CheckpointError, TrainingDivergedError
from ray_finetune.ports import free_port
from ray_finetune.spec import Duration
from ray_finetune.train import checkpoint
from ray_finetune.train.distributed import join_process_group
from ray_finetune.train.hardware import GRADIENT_CLIPPING
from ray_finetune.train.plan import continued_plan, make_plan
from trainer_helpers import packed_chat_run


def _rank(rank: int, world: int, port: int, arguments: dict, out: str) -> None:
    os.environ["RAY_FINETUNE_ZERO_STAGE"] = arguments.pop("zero_stage")
    os.environ["RAY_FINETUNE_PRECISION"] = arguments.pop("precision", "auto")
    os.environ["RAY_FINETUNE_ACTIVATION_CHECKPOINTING"] = arguments.pop("activation_checkpointing", "auto")
    os.environ["RAY_FINETUNE_CPU_MEMORY_GB"] = arguments.pop("cpu_memory_gb", "0")
    import faulthandler

    import torch
    import torch.distributed as dist

    from ray_finetune.train import loop

    faulthandler.dump_traceback_later(240, exit=True)   # a rank stuck in a collective says where, then ends
    mirrors = arguments.pop("mirrors", None)
    if mirrors:   # each rank on a "node" of its own: a mirror of its own
        os.environ[storage.MIRROR_ENV] = mirrors[rank]
    # How the object store treats the folders this rank uploads: {"slow_s": seconds each takes to begin, or
    # "refused_after": how many it takes before it refuses every other (read-only credentials from then on)}
    uploads = arguments.pop("uploads", {}).get(str(rank))
    if uploads:
        import time

        push, folders_pushed = storage.push, []

        def push_as_told(path, *more, **options):
            if Path(path).is_dir():
                time.sleep(uploads.get("slow_s", 0))
                if len(folders_pushed) >= uploads.get("refused_after", math.inf):
                    raise PermissionError("Access Denied")
                folders_pushed.append(path)
            push(path, *more, **options)

        storage.push = push_as_told
    # What this rank's node holds of the checkpoint it resumes from, once pulled for it (it is dropped after loading)
    pull_some, resume_files = storage.pull_some, []

    def pull_and_look(path, wanted):
        folder = pull_some(path, wanted)
        within = "universal/" if folder.name == checkpoint.UNIVERSAL_DIR else ""   # else the checkpoint's own
        resume_files.extend(sorted(within + str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()))
        return folder

    storage.pull_some = pull_and_look
    torch.set_num_threads(1)
    join_process_group(rank, world, ("127.0.0.1", port))
    stats = arguments.pop("stats")
    resume_from = arguments.get("resume_from")   # as the scheduler does: a resumed run keeps its checkpoint's plan
    plan = (continued_plan(checkpoint.read_state(storage.local(resume_from))["plan"], world) if resume_from else
            make_plan(rows=stats["rows"], tokens=stats["tokens"], duration=Duration(value=2, unit="ep"),
                      world_size=world, seed=0, global_batch_rows=arguments.pop("global_batch_rows", None)))
    losses: dict[int, float] = {}
    grad_norms: dict[int, float] = {}
    initialized: dict = {}
    evaluations: dict[int, dict] = {}
    saving: list[list] = []   # [step, the last step reported then, whether its checkpoint existed already]
    published_steps: list[dict] = []
    checkpoints = checkpoint.checkpoints_dir(arguments["save_folder"], arguments["run_name"])

    class Collect(loop.SilentReporter):
        def model_initialized(self, info): initialized.update(info)
        def step_finished(self, report):
            losses[report.step], grad_norms[report.step] = report.loss, report.grad_norm
        def saving_checkpoint(self, step):
            saving.append([step, max(losses, default=0),
                           any(folder.name.endswith(f"-ba{step}") for folder in checkpoints.glob("*"))])
        def evaluated(self, step, epoch, result):
            evaluations[step] = {"loss": result.loss, "token_accuracy": result.token_accuracy,
                                 "generations": result.generations}
        def checkpoint_saved(self, published):
            # what the storage holds when the checkpoint is reported, and how far training had gone by then
            pointed = storage.read_text(checkpoints / checkpoint.POINTER_NAME).strip()
            published_steps.append({"step": published.step, "reported_after_step": max(losses),
                                    "upload_seconds": published.upload_seconds, "pointer": pointed,
                                    "files": storage.children(published.path)})

    arguments.setdefault("learning_rate", 2e-3)
    try:
        loop.train(loop.TrainConfig(plan=plan, rank=rank, world_size=world, seed=0, **arguments), Collect())
    # refused before training, or stopped while training
    except (MemoryError, TrainingDivergedError, CheckpointError) as failed:
        Path(out).with_name(f"failed-{rank}.txt").write_text(json.dumps({"error": str(failed), "losses": losses}))
        dist.destroy_process_group()
        return
    Path(out).with_name(f"resume-files-{rank}.json").write_text(json.dumps(resume_files))
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": losses, "grad_norms": grad_norms, "initialized": initialized,
                                         "evaluations": evaluations, "saving": saving,
                                         "published": published_steps}))
    dist.destroy_process_group()


# Rank processes are forked from a server that has imported the training code once (~8 s of CPU a process here,
# as a trainer actor pays once per run); nothing of ours reads its settings at import, so each rank still trains
# under the settings it is given.
RANKS = multiprocessing.get_context("forkserver")
RANKS.set_forkserver_preload(["ray_finetune.train.loop", "deepspeed"])


def _in_environment(environment: dict[str, str], target, *arguments) -> None:
    """The server was started with the environment of the test that first used it: a rank gets its own test's."""
    os.environ.clear()
    os.environ.update(environment)
    target(*arguments)


def run_ranks(target, world: int, *arguments) -> None:
    """`target(rank, world, port, *arguments)` in one process per rank; every rank must end well."""
    port = free_port()
    processes = [RANKS.Process(target=_in_environment, args=(dict(os.environ), target, rank, world, port, *arguments))
                 for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]


def train_ranks(world: int, out: Path, **arguments) -> dict:
    run_ranks(_rank, world, dict(arguments), str(out))
    result = json.loads(out.read_text())
    return {"losses": {int(k): v for k, v in result["losses"].items()},
            "grad_norms": {int(k): v for k, v in result["grad_norms"].items()}, "initialized": result["initialized"],
            "evaluations": {int(k): v for k, v in result["evaluations"].items()}, "saving": result["saving"],
            "published": result["published"]}


def assert_goes_on_as_it_would_have(resumed: dict, uninterrupted: dict, resumed_at: int) -> None:
    """The resumed run trains the steps after `resumed_at`, each with the loss and gradient norm the uninterrupted
    run had (its weights, both moments and the optimizer's step came through)."""
    assert sorted(resumed["losses"]) == [s for s in sorted(uninterrupted["losses"]) if s > resumed_at]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(uninterrupted["losses"][step], rel=1e-4), step
        assert resumed["grad_norms"][step] == pytest.approx(uninterrupted["grad_norms"][step], rel=1e-3), step


@pytest.mark.parametrize("zero_stage, precision", [("0", "auto"), ("2", "auto"), ("3", "auto"), ("1", "bf16")])
def test_a_checkpoint_of_two_workers_resumes_on_one(tiny_model, tmp_path, zero_stage, precision):
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    common = dict(model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                  stats=stats.as_dict(), zero_stage=zero_stage, precision=precision)
    two = train_ranks(2, tmp_path / "two.json", run_name="two", save_folder=str(tmp_path / "two"), **common)
    assert two["initialized"]["zero_stage"] == int(zero_stage) and two["initialized"]["world_size"] == 2
    # Every step a checkpoint holds was reported (and so, by a trainer, sent to the log and acknowledged) before
    # the checkpoint existed: a run interrupted right after writing one resumes after those steps.
    folder = checkpoint.checkpoints_dir(tmp_path / "two", "two")
    saved_steps = sorted(checkpoint.parse_name(p.name)[1] for p in folder.iterdir() if checkpoint.is_complete(p))
    assert [step for step, _, _ in two["saving"]][-len(saved_steps):] == saved_steps
    assert all(reported == step and not existed for step, reported, existed in two["saving"])
    first_epoch = checkpoint.complete_checkpoints(folder)[0]
    resumed_at = checkpoint.parse_name(first_epoch.name)[1]
    one = train_ranks(1, tmp_path / "one.json", run_name="one", save_folder=str(tmp_path / "one"),
                      resume_from=str(first_epoch), **common)

    assert one["initialized"]["resumed_at_step"] == resumed_at > 0
    # ZeRO-2/3's per-rank state went through DeepSpeed's universal layout; ZeRO-0's needs no conversion
    assert (first_epoch / checkpoint.UNIVERSAL_DIR).is_dir() == (zero_stage != "0")
    if zero_stage != "0":   # the optimizer state by parameter (weights, moments): not the model once per weight
        # (ZeRO-1/2), nor rank 0's partition of it besides (ZeRO-3)
        weights = sum(f.stat().st_size for f in (first_epoch / checkpoint.WEIGHTS_DIR).glob("*.safetensors"))
        assert storage.size_here(first_epoch / checkpoint.UNIVERSAL_DIR) < 4 * weights
    assert_goes_on_as_it_would_have(one, two, resumed_at)


@pytest.mark.parametrize("stage_before, stage_after, workers_after", [("2", "3", 1), ("3", "2", 2)])
def test_a_checkpoint_resumes_under_another_zero_stage(tiny_model, tmp_path, stage_before, stage_after,
                                                       workers_after):
    """A requeued run may train under another ZeRO stage than the one that wrote its checkpoint: on GPUs the stage
    is chosen for the number of workers and their memory (on fewer GPUs, ZeRO-3 where ZeRO-2 fitted before), or an
    operator sets another. It resumes through the universal conversion, with the losses the run had."""
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    common = dict(model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                  stats=stats.as_dict())
    two = train_ranks(2, tmp_path / "two.json", run_name="two", save_folder=str(tmp_path / "two"),
                      zero_stage=stage_before, **common)
    folder = checkpoint.checkpoints_dir(tmp_path / "two", "two")
    first = checkpoint.complete_checkpoints(folder)[0]
    assert checkpoint.read_state(first)["deepspeed"] == {"zero_stage": int(stage_before), "bf16": False}
    resumed = train_ranks(workers_after, tmp_path / "resumed.json", run_name="resumed",
                          save_folder=str(tmp_path / "resumed"), resume_from=str(first), zero_stage=stage_after,
                          **common)
    at = resumed["initialized"]["resumed_at_step"]
    assert at > 0 and resumed["initialized"]["zero_stage"] == int(stage_after)
    assert (first / checkpoint.UNIVERSAL_DIR).is_dir()
    assert_goes_on_as_it_would_have(resumed, two, at)


def test_a_zero_0_checkpoint_is_not_resumed_under_another_stage_and_the_error_says_what_to_set(tiny_model,
                                                                                                tmp_path):
    """DeepSpeed converts no ZeRO-0 state (the CPU's fp32 default) to another stage: the attempt fails before it
    trains, naming both layouts, the settings that resume it and the weights a new run can start from."""
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    common = dict(model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                  stats=stats.as_dict())
    train_ranks(1, tmp_path / "one.json", run_name="one", save_folder=str(tmp_path / "one"), zero_stage="0",
                **common)
    newest = checkpoint.latest_complete(checkpoint.checkpoints_dir(tmp_path / "one", "one"))
    out = tmp_path / "resumed.json"
    run_ranks(_rank, 1, dict(run_name="resumed", save_folder=str(tmp_path / "resumed"), resume_from=str(newest),
                             zero_stage="2", **common), str(out))
    failed = json.loads(out.with_name("failed-0.txt").read_text())
    assert failed["losses"] == {} and not out.exists()
    assert failed["error"] == (
        f"checkpoint {newest.name} holds DeepSpeed state of ZeRO-0 fp32 and this attempt trains under ZeRO-2 fp32: "
        "DeepSpeed loads ZeRO-0 state under the same precision and ZeRO-0 only, and converts none into it. Set "
        "RAY_FINETUNE_ZERO_STAGE and RAY_FINETUNE_PRECISION as they were when it was written to resume the run, or "
        f"create a new run with custom_weights_path='{newest}' to start from its weights")


def test_a_checkpoint_in_a_bucket_resumes_on_another_node_with_another_number_of_workers(s3, tiny_model, tmp_path,
                                                                                        monkeypatch):
    """Object storage: two ZeRO-2 workers write their checkpoints into the bucket from one node's mirror; one worker
    on a node whose mirror has nothing resumes from the s3:// URL (the per-rank state converted to the universal
    layout, which goes up too) with the losses the run had; and again after that conversion's upload was cut short."""
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    common = dict(model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                  stats=stats.as_dict(), zero_stage="2")
    monkeypatch.setenv(storage.MIRROR_ENV, str(tmp_path / "node-a"))
    two = train_ranks(2, tmp_path / "two.json", run_name="two", save_folder="s3://training-data/runs", **common)
    folder = checkpoint.checkpoints_dir("s3://training-data/runs", "two")
    first = checkpoint.complete_checkpoints(folder)[0]
    resumed_at = checkpoint.parse_name(first.name)[1]
    assert not (tmp_path / "node-a" / "s3").exists() or not list((tmp_path / "node-a" / "s3").rglob("*.pt"))

    monkeypatch.setenv(storage.MIRROR_ENV, str(tmp_path / "node-b"))
    one = train_ranks(1, tmp_path / "one.json", run_name="one", save_folder=str(tmp_path / "one"),
                      resume_from=f"s3://training-data/runs/two/checkpoints/{first.name}", **common)
    assert one["initialized"]["resumed_at_step"] == resumed_at > 0
    assert storage.exists(storage.local(f"s3://training-data/runs/two/checkpoints/{first.name}/universal"))
    assert not list((tmp_path / "node-b").rglob("*.pt"))   # loaded, then dropped: the bucket has it
    assert_goes_on_as_it_would_have(one, two, resumed_at)

    # The conversion's upload cut short (its marker, written last, and a file of it missing from the bucket): the
    # next attempt, on a node that has nothing, converts again instead of loading the part that went up.
    converted = f"training-data/runs/two/checkpoints/{first.name}/{checkpoint.UNIVERSAL_DIR}"
    bucket = fsspec.filesystem("s3")
    bucket.rm(f"{converted}/{checkpoint.CONVERTED_FILE}")
    bucket.rm(sorted(path for path in bucket.find(converted) if path.endswith(".pt"))[-1])
    monkeypatch.setenv(storage.MIRROR_ENV, str(tmp_path / "node-c"))
    again = train_ranks(1, tmp_path / "again.json", run_name="again", save_folder=str(tmp_path / "again"),
                        resume_from=f"s3://training-data/runs/two/checkpoints/{first.name}", **common)
    assert again["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert bucket.exists(f"{converted}/{checkpoint.CONVERTED_FILE}")


def test_a_node_resuming_on_as_many_workers_pulls_only_its_own_ranks_partitions(s3, tiny_model, tmp_path):
    """Object storage, two ZeRO-2 workers on two "nodes" (a mirror each): resumed on two workers again, on nodes
    whose mirrors hold nothing, each node downloads the checkpoint's shared files and its own rank's optimizer
    partition -- not the other rank's, nor the consolidated weights -- and the run goes on with the losses it had."""
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    common = dict(model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                  stats=stats.as_dict(), zero_stage="2")
    two = train_ranks(2, tmp_path / "two.json", run_name="two", save_folder="s3://training-data/runs",
                      mirrors=[str(tmp_path / "a"), str(tmp_path / "b")], **common)
    folder = checkpoint.checkpoints_dir("s3://training-data/runs", "two")
    first = checkpoint.complete_checkpoints(folder)[0]
    resumed_at = checkpoint.parse_name(first.name)[1]
    stored = storage.children(first)
    assert any(name.startswith("zero_pp_rank_1_") for name in stored) and checkpoint.WEIGHTS_DIR in stored

    again = train_ranks(2, tmp_path / "again.json", run_name="again", save_folder=str(tmp_path / "again"),
                        mirrors=[str(tmp_path / "c"), str(tmp_path / "d")],
                        resume_from=f"s3://training-data/runs/two/checkpoints/{first.name}", **common)
    assert again["initialized"]["resumed_at_step"] == resumed_at > 0
    for rank in (0, 1):
        pulled = json.loads((tmp_path / f"resume-files-{rank}.json").read_text())
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in pulled, pulled
        assert "mp_rank_00_model_states.pt" in pulled and checkpoint.STATE_FILE in pulled
        assert not [name for name in pulled if name.startswith((f"zero_pp_rank_{1 - rank}_", "model/"))], pulled
    for node in "cd":
        assert not list((tmp_path / node).rglob("*.pt"))   # loaded, then dropped: the bucket has it
    assert_goes_on_as_it_would_have(again, two, resumed_at)


def test_on_another_number_of_workers_only_rank_0_s_node_pulls_the_partitions_it_converts(s3, tiny_model, tmp_path):
    """Object storage: a ZeRO-2 checkpoint of one worker resumed on two workers on two "nodes" whose mirrors hold
    nothing: rank 0's node pulls the per-rank state and converts it to the universal layout; the other node pulls
    that conversion only (a node of an N-node group would otherwise download every rank's partition to load none
    of them), and the run goes on with the losses it had."""
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    common = dict(model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                  stats=stats.as_dict(), zero_stage="2")
    one = train_ranks(1, tmp_path / "one.json", run_name="one", save_folder="s3://training-data/runs",
                      mirrors=[str(tmp_path / "a")], global_batch_rows=2, **common)
    folder = checkpoint.checkpoints_dir("s3://training-data/runs", "one")
    first = checkpoint.complete_checkpoints(folder)[0]
    resumed_at = checkpoint.parse_name(first.name)[1]

    two = train_ranks(2, tmp_path / "two.json", run_name="two", save_folder=str(tmp_path / "two"),
                      mirrors=[str(tmp_path / "c"), str(tmp_path / "d")],
                      resume_from=f"s3://training-data/runs/one/checkpoints/{first.name}", **common)
    assert two["initialized"]["resumed_at_step"] == resumed_at > 0 and two["initialized"]["world_size"] == 2
    converter, other = (json.loads((tmp_path / f"resume-files-{rank}.json").read_text()) for rank in (0, 1))
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in converter, converter
    assert f"universal/{checkpoint.CONVERTED_FILE}" in other and "universal/mp_rank_00_model_states.pt" in other
    assert all(name.startswith("universal/") for name in other), other
    for node in "cd":
        assert not list((tmp_path / node).rglob("*.pt"))   # loaded, then dropped: the bucket has it
    assert_goes_on_as_it_would_have(two, one, resumed_at)


def test_training_goes_on_while_a_checkpoint_goes_up_and_it_counts_once_every_node_s_files_are_there(
        s3, tiny_model, tmp_path, monkeypatch):
    """Object storage, two workers on two "nodes" (a mirror each), the second node's uploads slow: training does not
    wait for them, and rank 0 completes each checkpoint (trainer state, pointer) only after the other node's files
    are up -- what a resumed run needs to find there."""
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    slow_s = 2.0
    run = train_ranks(2, tmp_path / "two.json", run_name="two", save_folder="s3://training-data/runs",
                      model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                      stats=stats.as_dict(), zero_stage="2", uploads={"1": {"slow_s": slow_s}},
                      mirrors=[str(tmp_path / "node-a"), str(tmp_path / "node-b")])
    published, last_step = run["published"], max(run["losses"])
    assert [p["step"] for p in published] == [s for s, _, _ in run["saving"]] and len(published) == 2
    first = published[0]
    assert first["reported_after_step"] > first["step"]   # steps went on while it went up
    for done in published:
        assert done["upload_seconds"] >= slow_s   # rank 0's own files take milliseconds: it waited for node b's
        assert done["pointer"] == f"ep{done['step'] // (last_step // 2)}-ba{done['step']}"
        assert "trainer_state.json" in done["files"] and any("rank_1" in name for name in done["files"])
    assert published[-1]["reported_after_step"] == last_step
    for node in ("node-a", "node-b"):   # a node keeps a checkpoint only while it writes it
        assert not list((tmp_path / node).rglob("*.pt"))


def test_a_checkpoint_the_bucket_refuses_fails_training_and_leaves_the_one_before(s3, tiny_model, tmp_path,
                                                                                  monkeypatch):
    """An upload failing in the background fails training with its reason, at a step boundary; the checkpoint
    before it stays the newest complete one, and the pointer still names it."""
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    monkeypatch.setenv(storage.MIRROR_ENV, str(tmp_path / "node"))
    out = tmp_path / "one.json"
    run_ranks(_rank, 1, dict(run_name="one", save_folder="s3://training-data/runs", model_path=str(tiny_model),
                             init_weights_path=None, train_rows_path=rows_path, stats=stats.as_dict(),
                             zero_stage="0", uploads={"0": {"refused_after": 1}}), str(out))
    failed = json.loads(out.with_name("failed-0.txt").read_text())
    folder = checkpoint.checkpoints_dir("s3://training-data/runs", "one")
    newest = checkpoint.latest_complete(folder)
    assert failed["error"].startswith(f"could not upload checkpoint ep2-ba{2 * newest_step(newest)} to "
                                      "s3://training-data/runs/one/checkpoints: PermissionError: Access Denied "
                                      "(earlier checkpoints are intact)")
    assert newest.name == f"ep1-ba{newest_step(newest)}"
    assert storage.read_text(folder / checkpoint.POINTER_NAME).strip() == newest.name


def newest_step(folder: Path) -> int:
    return checkpoint.parse_name(folder.name)[1]


PROMPTS = ("what is the capital of france?", "count to five")


def _eval_rows(model, folder: Path) -> str:
    """Eval data packed into an odd number of rows, so that two ranks split it unevenly."""
    from ray_finetune.data import formats, packing, sources
    from ray_finetune.train.models import load_tokenizer
    from tiny_model import write_chat_jsonl

    tokenizer = load_tokenizer(model)
    for count in range(5, 40):
        data = write_chat_jsonl(folder / f"eval-{count}.jsonl", count)
        examples = formats.examples_from_records(tokenizer, "CHAT_COMPLETION",
                                                 sources.read_records(sources.locate("eval", str(data))))
        rows, _ = packing.pack_examples(examples, 64, tokenizer.pad_token_id)
        if len(rows.input_ids) % 2 == 1 and len(rows.input_ids) > 1:
            rows.save(folder / "eval_rows")
            return str(folder / "eval_rows")
    raise AssertionError("no odd row count")


def _scored_alone(weights: str, rows_path: str) -> tuple[float, float]:
    """Eval loss and token accuracy of `weights` computed in this one process, one row at a time."""
    import numpy as np
    import torch

    from ray_finetune.data.packing import PackedRows
    from ray_finetune.train.models import load_model
    from ray_finetune.train.step import CausalLMLoss, forward_loss, make_batch

    rows, model = PackedRows.load(rows_path), load_model(weights).eval()
    loss, targets, correct = 0.0, 0, 0
    with torch.no_grad():
        for index in range(len(rows)):
            result = forward_loss(CausalLMLoss(model), make_batch(rows, np.array([index])))
            loss, targets, correct = (loss + float(result.loss_sum), targets + result.target_tokens,
                                      correct + result.correct_tokens)
    return loss / targets, correct / targets


def test_zero3_trains_scores_and_saves_what_zero0_does(tiny_model, tmp_path):
    """ZeRO-3 partitions the weights themselves, from loading on: every layer is gathered when it runs (again when
    its activations are recomputed, as they are on GPUs under ZeRO-3), the chunked loss borrows the output weight
    (tied to the embeddings in this model), and the checkpoint's model/ must hold whole weights, not this rank's
    slice. The trainers evaluate before the first step and at every checkpoint: their scores of the eval data, split
    over the ranks (unevenly: padded), are what one process scoring the same weights alone gets; every eval prompt
    is sampled, alike under both stages from the same weights."""
    import torch
    from safetensors.torch import load_file

    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    eval_rows = _eval_rows(tiny_model, tmp_path)
    runs, weights = {}, {}
    for stage in ("0", "3"):
        runs[stage] = train_ranks(2, tmp_path / f"{stage}.json", run_name=f"z{stage}",
                                  save_folder=str(tmp_path / stage), model_path=str(tiny_model),
                                  init_weights_path=None, train_rows_path=rows_path, stats=stats.as_dict(),
                                  zero_stage=stage, activation_checkpointing="on" if stage == "3" else "off",
                                  eval_rows_path=eval_rows, evaluate_first=True, eval_prompts=PROMPTS)
        final = checkpoint.latest_complete(checkpoint.checkpoints_dir(tmp_path / stage, f"z{stage}"))
        weights[stage] = load_file(str(final / checkpoint.WEIGHTS_DIR / "model.safetensors"))
    assert runs["3"]["initialized"]["zero_stage"] == 3 and runs["3"]["initialized"]["activation_checkpointing"]
    # the output layer's split was probed on the sharded model, through DeepSpeed's gathers
    assert runs["3"]["initialized"]["chunked_loss"] and runs["0"]["initialized"]["chunked_loss"]
    assert sorted(runs["3"]["losses"]) == sorted(runs["0"]["losses"])
    for step, loss in runs["0"]["losses"].items():
        assert runs["3"]["losses"][step] == pytest.approx(loss, rel=1e-4), step
        assert runs["3"]["grad_norms"][step] == pytest.approx(runs["0"]["grad_norms"][step], rel=1e-3), step
    # the norm each step reports is its whole gradient's (both ranks' rows), before clipping scaled it down
    first = _first_step_gradient_norm(tiny_model, rows_path, stats)
    assert first > GRADIENT_CLIPPING
    for stage in ("0", "3"):
        assert runs[stage]["grad_norms"][1] == pytest.approx(first, rel=1e-4), stage
    assert weights["3"].keys() == weights["0"].keys()
    for name, value in weights["0"].items():
        assert weights["3"][name].shape == value.shape, name
        torch.testing.assert_close(weights["3"][name], value, rtol=1e-3, atol=1e-4, msg=name)

    checkpointed = sorted(runs["0"]["evaluations"])
    assert checkpointed[0] == 0 and checkpointed[-1] == max(runs["0"]["losses"]) and len(checkpointed) == 3
    for stage in ("0", "3"):
        assert sorted(runs[stage]["evaluations"]) == checkpointed
        saved = {checkpoint.parse_name(folder.name)[1]: folder / checkpoint.WEIGHTS_DIR
                 for folder in checkpoint.checkpoints_dir(tmp_path / stage, f"z{stage}").iterdir()
                 if checkpoint.is_complete(folder)}
        for step, evaluated in runs[stage]["evaluations"].items():
            loss, accuracy = _scored_alone(str(saved[step]) if step else str(tiny_model), eval_rows)
            assert evaluated["loss"] == pytest.approx(loss, rel=1e-4), (stage, step)
            assert evaluated["token_accuracy"] == pytest.approx(accuracy, abs=1e-6), (stage, step)
            assert [g["prompt"] for g in evaluated["generations"]] == list(PROMPTS)
            assert all(isinstance(g["generation"], str) for g in evaluated["generations"])
    assert runs["3"]["evaluations"][0]["generations"] == runs["0"]["evaluations"][0]["generations"]
    final = runs["0"]["evaluations"][checkpointed[-1]]["loss"]
    assert final < runs["0"]["evaluations"][0]["loss"]


def _load_sharded_rank(rank: int, world: int, port: int, model_path: str, weights: str, out: str) -> None:
    import faulthandler

    import deepspeed
    import torch
    import torch.distributed as dist

    from ray_finetune.train.models import load_initial_model

    faulthandler.dump_traceback_later(240, exit=True)
    join_process_group(rank, world, ("127.0.0.1", port))
    zero3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
             "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    model = load_initial_model(model_path, weights, zero3_config=zero3)
    unique = {id(p): p for p in model.parameters()}.values()
    held = {"held": sum(p.ds_tensor.numel() for p in unique), "whole": sum(p.ds_numel for p in unique),
            "visible": sum(p.numel() for p in unique)}
    gathered = {}
    for name, parameter in model.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter]):
            gathered[name] = parameter.detach().clone()
    torch.save({"held": held, "weights": gathered}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_zero3_ranks_load_only_their_shards(tiny_model, tmp_path):
    """Under ZeRO-3 no rank builds the whole model: each holds its half of every weight from loading on, and a .pt
    of custom weights lands in the shards (the weights it names; the base model's elsewhere)."""
    import torch
    from safetensors.torch import load_file

    base = load_file(str(tiny_model / "model.safetensors"))
    custom = {name: value + 1.0 for name, value in base.items() if ".layers.0." in name or "embed" in name}
    custom["lm_head.weight"] = custom["model.embed_tokens.weight"]   # a state dict names tied weights twice
    torch.save(custom, tmp_path / "custom.pt")
    run_ranks(_load_sharded_rank, 2, str(tiny_model), str(tmp_path / "custom.pt"), str(tmp_path / "loaded"))

    for rank in range(2):
        loaded = torch.load(tmp_path / f"loaded.{rank}", weights_only=True)
        held = loaded["held"]
        assert held["visible"] == 0   # every parameter is a placeholder outside DeepSpeed's gathers
        assert held["whole"] / 2 <= held["held"] <= held["whole"] / 2 + 64   # half, padded to equal shards
        assert loaded["weights"].keys() == base.keys()   # the output layer is tied to the embeddings
        for name, value in loaded["weights"].items():
            torch.testing.assert_close(value, custom.get(name, base.get(name)), rtol=0, atol=0, msg=name)


def _first_step_gradient_norm(model_path, rows_path: str, stats) -> float:
    """The L2 norm of the gradient of step 1's mean token loss, computed in this one process, one row at a time."""
    import numpy as np
    import torch

    from ray_finetune.data.packing import PackedRows
    from ray_finetune.train.models import load_model
    from ray_finetune.train.plan import EMPTY_ROW
    from ray_finetune.train.step import CausalLMLoss, forward_loss, make_batch

    plan = make_plan(rows=stats.rows, tokens=stats.tokens, duration=Duration(value=2, unit="ep"), world_size=2,
                     seed=0)
    rows, model = PackedRows.load(rows_path), load_model(model_path).train()
    step_rows = [index for index in plan.step_rows(0) if index != EMPTY_ROW]
    targets = rows.target_tokens(step_rows)
    for index in step_rows:
        (forward_loss(CausalLMLoss(model), make_batch(rows, np.array([index]))).loss_sum / targets).backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


def test_a_bf16_run_saves_its_fp32_master_weights(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    run = train_ranks(1, tmp_path / "bf16.json", run_name="bf16", save_folder=str(tmp_path / "bf16"),
                      model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                      stats=stats.as_dict(), zero_stage="auto", precision="bf16")
    assert run["initialized"]["precision"] == "bf16" and run["initialized"]["zero_stage"] == 1

    final = checkpoint.latest_complete(checkpoint.checkpoints_dir(tmp_path / "bf16", "bf16"))
    saved = load_file(str(final / checkpoint.WEIGHTS_DIR / "model.safetensors"))
    initial = load_file(str(tiny_model / "model.safetensors"))
    weight = "model.layers.0.mlp.down_proj.weight"
    assert saved[weight].dtype == torch.float32
    assert not torch.equal(saved[weight], initial[weight])                  # trained
    # fp32 masters: most values fall between two bf16 numbers; a bf16 copy would round-trip exactly
    assert not torch.equal(saved[weight], saved[weight].to(torch.bfloat16).float())


def test_cpu_trainers_on_one_node_share_its_memory(tiny_model, tmp_path):
    """RAY_FINETUNE_CPU_MEMORY_GB is what a node gives a run's CPU trainers together: a budget with room for one
    trainer of this run refuses two on the node, each saying what it needs, before any training starts."""
    import torch

    from ray_finetune.data.packing import PackedRows
    from ray_finetune.train import loop
    from ray_finetune.train.hardware import FP32
    from ray_finetune.train.models import load_model

    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    model = load_model(tiny_model)
    plan = make_plan(rows=stats.rows, tokens=stats.tokens, duration=Duration(value=2, unit="ep"), world_size=1, seed=0)
    _, alone = loop.fit_memory(model, sum(p.numel() for p in model.parameters()), plan, PackedRows.load(rows_path),
                                torch.device("cpu"), FP32, 0, "auto", (2**40, "plenty"))
    budget_gb = 1.5 * alone["memory"]["needed_gb"]          # room for one trainer; two get 0.75 of it each
    out = tmp_path / "two.json"
    run_ranks(_rank, 2, dict(model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                             stats=stats.as_dict(), zero_stage="auto", cpu_memory_gb=str(budget_gb), run_name="two",
                             save_folder=str(tmp_path / "two")), str(out))
    assert not out.exists()                                  # no rank trained
    for rank in range(2):
        refused = json.loads((tmp_path / f"failed-{rank}.txt").read_text())["error"]
        assert f"RAY_FINETUNE_CPU_MEMORY_GB={budget_gb:g}, shared by the 2 trainers on this node" in refused
        assert "training needs about" in refused and "context_length=64" in refused
    assert not (tmp_path / "two").exists() or not any((tmp_path / "two").rglob("ep*-ba*"))


@pytest.mark.parametrize("zero_stage", ["0", "2"])
def test_a_run_that_diverges_stops_at_that_step_and_keeps_the_checkpoints_before_it(tiny_model, tmp_path, zero_stage):
    """A learning rate far too high makes the weights infinite within a few steps: every rank stops at the first step
    whose loss or gradient is not a number, before that step is reported or saved, and says which checkpoint holds
    the weights before it. Under ZeRO-0 the loop measures the gradient norm itself, under ZeRO-2 DeepSpeed does."""
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    out = tmp_path / "diverged.json"
    run_ranks(_rank, 2, dict(model_path=str(tiny_model), init_weights_path=None, train_rows_path=rows_path,
                             stats=stats.as_dict(), zero_stage=zero_stage, run_name="d", save_folder=str(tmp_path / "d"),
                             learning_rate=1e30, checkpoint_every=Duration(value=1, unit="ba")), str(out))
    assert not out.exists()                                  # it did not train to the end
    failed = [json.loads((tmp_path / f"failed-{rank}.txt").read_text()) for rank in range(2)]
    assert failed[0]["error"] == failed[1]["error"]
    reported = {int(step): loss for step, loss in failed[0]["losses"].items()}
    diverged_at = len(reported) + 1
    assert reported and all(math.isfinite(loss) for loss in reported.values())
    saved = sorted(checkpoint.parse_name(p.name)[1] for p in checkpoint.checkpoints_dir(tmp_path / "d", "d").iterdir()
                   if checkpoint.is_complete(p))
    assert saved[-1] == diverged_at - 1                      # every step before it was saved, none after
    assert f"training diverged at step {diverged_at} of " in failed[0]["error"]
    assert f"the newest checkpoint, ep0-ba{diverged_at - 1}, holds the weights before it" in failed[0]["error"]
