"""Data preparation end to end: locate → shard → tokenize → pack, cached by content so a second run (or a resumed
run) on the same data does not tokenize again. Used by the data packer actor and by estimate()."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray

from ray_finetune import storage
from ray_finetune.data import cache, packing, sources
from ray_finetune.data.tokenized import ExampleTable, TokenizeJob
from ray_finetune.errors import ValidationError

# What rows a task type's data becomes, by version: bump a task type's when its formatting or packing changes what
# its rows contain (its cached rows are then prepared again, and a run resumed across the change refuses the new
# data), and only that task type's. CONTINUED_PRETRAIN 3: a last row with nothing to learn is left out.
FORMAT_VERSIONS = {"CHAT_COMPLETION": 2, "INSTRUCTION_FINETUNE": 2, "CONTINUED_PRETRAIN": 3}


@dataclass(frozen=True)
class Prepared:
    rows_path: str     # a folder of PackedRows arrays
    stats: dict[str, Any]
    cached: bool
    shards: int = 0    # how many pieces the source was tokenized in (0: it came from the cache)


# Told, as tokenizing goes on, how many of a source's shards are done and how many there are.
ShardProgress = Callable[[int, int], None]
# Asked, as tokenizing goes on, whether the caller wants the preparation stopped (its run was cancelled).
StopRequested = Callable[[], bool]
# Runs tokenize jobs and returns their shard prefixes in job order, telling its ShardProgress as each is done and
# raising PreparationStopped once StopRequested says so: in this process by default; on_cluster() gives one that
# spreads them over the cluster as Ray tasks. A source of one shard is always tokenized in this process: a task would
# only add a worker's start-up to a small run's wait.
MapShards = Callable[[list[TokenizeJob], ShardProgress, StopRequested], list[str]]
# How often a preparation spread over the cluster asks whether to stop while no shard finishes: its tasks may wait for
# CPUs that trainers hold, and a cancelled run's preparation must not wait with them.
STOP_CHECK_S = 1.0
# How long a preparation that stops waits for its cancelled tokenize tasks to end before it removes their folder.
CANCELLED_TASKS_WAIT_S = 30.0


class PreparationStopped(Exception):
    """The caller asked the preparation to stop; nothing of it was published."""


@ray.remote(num_cpus=1, max_retries=2)
def _tokenize_shard_task(job: TokenizeJob) -> str:
    return job.run()


def map_over_cluster(jobs: list[TokenizeJob], progress: ShardProgress, stop_requested: StopRequested) -> list[str]:
    """Ray runs as many tokenize tasks at once as the cluster has free CPUs; the rest queue."""
    tasks = [_tokenize_shard_task.remote(job) for job in jobs]
    pending = tasks
    try:
        while pending:
            if stop_requested():
                raise PreparationStopped(f"stopped with {len(tasks) - len(pending)} of {len(tasks)} shards tokenized")
            finished, pending = ray.wait(pending, num_returns=1, timeout=STOP_CHECK_S)
            if finished:
                progress(len(tasks) - len(pending), len(tasks))
        return ray.get(tasks)
    except BaseException:
        for task in pending:
            ray.cancel(task)
        # Tasks in the middle of a shard end when they next run Python code; the caller removes the folder they
        # write into once this returns, so give them a moment to stop first (a later one fails writing: see
        # tokenized.tokenize_shard).
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=CANCELLED_TASKS_WAIT_S)
        raise


def _map_here(jobs: list[TokenizeJob], progress: ShardProgress, stop_requested: StopRequested,
              tokenizer: Any) -> list[str]:
    prefixes = []
    for job in jobs:
        if stop_requested():
            raise PreparationStopped(f"stopped with {len(prefixes)} of {len(jobs)} shards tokenized")
        prefixes.append(job.run(tokenizer))
        progress(len(prefixes), len(jobs))
    return prefixes


def _never() -> bool:
    return False


def _no_progress(done: int, total: int) -> None:
    pass


# Shards per CPU when a large source is spread over a cluster: several each, so that a CPU that finishes early takes
# another (the slowest shard bounds the wait) and progress is told in steps that mean something. Measured on a 62 MB
# chat file over 4 task slots: 4 shards 49-64 s, 16 shards 44-46 s, a shard done every ~2 s instead of all at the end.
SHARDS_PER_CPU = 4


def on_cluster(cpus: int | None = None) -> dict[str, Any]:
    """prepare()'s arguments for tokenizing on the connected Ray cluster: at least SHARDS_PER_CPU shards per CPU
    (`cpus`, by default all the cluster's; each shard at least MIN_SHARD_BYTES), one task each -- the data packer's
    way, and a dry run's when a cluster is up."""
    cpus = cpus or int(ray.cluster_resources().get("CPU", 1))
    return {"map_shards": map_over_cluster, "parallelism": SHARDS_PER_CPU * cpus}


def tokenizer_fingerprint(model_path: str | Path) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                 "tokenizer.model"):
        file = Path(model_path) / name
        if file.exists():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_key(source: sources.DataSource, model_path: str, task_type: str, context_length: int) -> str:
    parts = [sources.fingerprint(source), tokenizer_fingerprint(model_path), task_type, str(context_length),
             str(FORMAT_VERSIONS[task_type])]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def prepare(parameter: str, path: str, *, task_type: str, model_path: str, tokenizer: Any, context_length: int,
            cache_dir: Path, data_prep_cluster_id: str | None = None, map_shards: MapShards | None = None,
            shard_bytes: int = sources.SHARD_BYTES, parallelism: int = 1,
            progress: ShardProgress = _no_progress, stop_requested: StopRequested = _never) -> Prepared:
    """Packed rows for one dataset, from the cache when the same data was packed the same way before.

    tokenize (shards, in parallel where map_shards allows) → pack (streaming, from memory-mapped shards) →
    publish. Work happens in a folder private to this call; the finished rows are renamed into place and the
    stats file, written last, marks the entry complete, so concurrent or interrupted preparations never leave
    a half-written entry that a run would use. Raises PreparationStopped, its folder removed, once `stop_requested`
    says so while it tokenizes.
    """
    source = sources.locate(parameter, path, data_prep_cluster_id)
    folder = cache_dir / cache_key(source, model_path, task_type, context_length)
    rows_dir, stats_file = folder / "rows", folder / "stats.json"
    if not stats_file.exists() and storage.is_mirrored(stats_file) and storage.exists(stats_file):
        try:   # packed on another node: the object store has the entry (its stats pushed last)
            storage.pull(rows_dir)
            storage.pull(stats_file)
        except FileNotFoundError:
            pass   # removed from the cache meanwhile: packed again below
    if rows_dir.is_dir() and stats_file.exists():
        try:
            cached = json.loads(stats_file.read_text())
        except ValueError:   # damaged (it is replaced whole, so not by a write cut short): packed again, below
            cached = None
        if cached is not None:
            _require_rows(parameter, source, cached, context_length)   # earlier versions published empty entries
            cache.mark_used(rows_dir)
            return Prepared(str(rows_dir), cached, cached=True)
    cache.remove_orphaned_work(cache_dir)
    work = folder / cache.new_work_folder_name()
    try:
        (work / "tokens").mkdir(parents=True)
        jobs = [TokenizeJob(source, shard, task_type, model_path, context_length, str(work / "tokens"))
                for shard in sources.plan_shards(source, shard_bytes, parallelism)]
        progress(0, len(jobs))
        spread = map_shards is not None and len(jobs) > 1
        prefixes = (map_shards(jobs, progress, stop_requested) if spread
                    else _map_here(jobs, progress, stop_requested, tokenizer))
        pack = packing.pack_stream if task_type == "CONTINUED_PRETRAIN" else packing.pack_examples
        _, stats = pack(ExampleTable.open(prefixes), context_length, tokenizer.pad_token_id, folder=work / "rows")
        _require_rows(parameter, source, stats.as_dict(), context_length)
        try:
            (work / "rows").rename(rows_dir)
        except OSError:
            if not rows_dir.is_dir():   # not "another preparation of the same data got there first"
                raise
            if not packing.PackedRows.is_whole(rows_dir):   # what a removal cut short left: replaced, never used
                shutil.rmtree(rows_dir)
                (work / "rows").rename(rows_dir)
        temporary_stats = work / "stats.json"
        temporary_stats.write_text(json.dumps(stats.as_dict()))
        temporary_stats.replace(stats_file)
        storage.push(rows_dir)   # on object storage, for the trainers of other nodes: the stats last
        storage.push(stats_file)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):   # stopped or failed before it published: no empty entry left behind
            folder.rmdir()                   # (never one that holds anything: another preparation's work, rows)
    return Prepared(str(rows_dir), stats.as_dict(), cached=False, shards=len(jobs))


def _require_rows(parameter: str, source: sources.DataSource, stats: dict[str, Any], context_length: int) -> None:
    """Data whose every example was dropped (no token the loss is taken on within context_length) cannot train
    or be scored: said here, for the train and the eval data alike, before a trainer is started for it."""
    if stats["rows"] == 0:
        raise ValidationError(parameter, f"leaves nothing to train on: none of its {stats['examples']} examples has "
                              f"a trained token within its first {context_length} tokens", file=source.where,
                              expected="examples whose trained tokens (assistant turns, responses) begin within "
                                       "context_length tokens, or a longer context_length")
