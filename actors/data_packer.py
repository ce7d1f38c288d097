"""The data packer actor: reads a run's data, formats it (template + loss mask) and packs it into rows, reusing
packed rows cached from an earlier run on the same data. Tokenization is spread over the cluster: one Ray task
per shard of the source, each writing its tokens to shared storage.

One packer serves the cluster (named, detached, on the head node like the scheduler), a thread per run: its process
keeps torch, transformers and the tokenizer code imported from one run to the next. A packer started for each run
paid those imports every time: 4.5-5.4 s of a small run's 16 s on the 2-core box (BENCHMARKS.md)."""
from __future__ import annotations

import threading
import time
from typing import Callable

import ray

from actors.event_sink import EventSink, one_per_cluster
from actors.messages import PackedData, PackRequest
from eventstore.schema import EventType
from ray_finetune import settings, storage
from ray_finetune.data.packing import packed_data_id
from ray_finetune.data.prepare import PreparationStopped, on_cluster, prepare
from ray_finetune.train.models import load_tokenizer

ACTOR_NAME = "ray_finetune_data_packer"
# Runs packing at once; each mostly waits on its tokenize tasks, which Ray spreads over the cluster's CPUs.
MAX_CONCURRENT_PACKS = 32
# Tokenizing a large dataset takes minutes; a run that sits in STARTING says how far it has got this often.
PROGRESS_EVERY_S = 10.0
# Cancellations kept for requests that are not being packed (not started yet, or already finished).
REMEMBERED_ABANDONMENTS = 256


class Abandonments:
    """Which of the requests being packed were abandoned. Ray may run a cancellation before the pack it cancels (the
    packer's threads take calls in any order), so one for a request not seen yet is kept; one that arrives after its
    request finished (the run was cancelled as its data came back) is kept too, so only the newest
    REMEMBERED_ABANDONMENTS of those stay: the packer lives as long as the cluster."""

    def __init__(self) -> None:
        self._lock = threading.Lock()   # the packer's threads pack, finish and abandon requests at once
        self._packing: set[str] = set()
        self._abandoned: dict[str, None] = {}   # in the order they came

    def started(self, request_id: str) -> None:
        with self._lock:
            self._packing.add(request_id)

    def abandon(self, request_id: str) -> None:
        with self._lock:
            self._abandoned[request_id] = None
            idle = [known for known in self._abandoned if known not in self._packing]
            for oldest in idle[:max(0, len(idle) - REMEMBERED_ABANDONMENTS)]:
                del self._abandoned[oldest]

    def is_abandoned(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._abandoned

    def finished(self, request_id: str) -> None:
        with self._lock:
            self._packing.discard(request_id)
            self._abandoned.pop(request_id, None)

    def __len__(self) -> int:
        """Requests remembered (packing or abandoned)."""
        with self._lock:
            return len(self._packing | self._abandoned.keys())


class ProgressEvents:
    """DATA_PROGRESS events for one dataset of a run, at most one per PROGRESS_EVERY_S (none for data that
    tokenizes quicker than that: DATA_VALIDATED follows at once)."""

    def __init__(self, sink: EventSink, parameter: str) -> None:
        self._sink, self._parameter, self._told_at = sink, parameter, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if done < total and time.monotonic() - self._told_at >= PROGRESS_EVERY_S:
            self._told_at = time.monotonic()
            self._sink.emit(EventType.DATA_PROGRESS, f"tokenized {done} of {total} shards of {self._parameter}",
                            {"parameter": self._parameter, "shards_done": done, "shards": total})


# The packer itself mostly waits on its tokenize tasks and then packs from memory-mapped shards; it takes no CPU
# from Ray's accounting so that on a small machine those tasks get every core. If its process dies, Ray starts it
# again; the runs it was packing for see their worker die and are requeued, as for any other interruption.
@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=MAX_CONCURRENT_PACKS)
class DataPacker:
    def __init__(self) -> None:
        self._abandonments = Abandonments()
        # Imported now (the scheduler starts the packer when it starts) rather than during the first run: a
        # model's config class pulls in torch and most of what loading any tokenizer needs (3.4 s on the 2-core box).
        try:
            from transformers import AutoConfig

            AutoConfig.for_model("llama")
        except Exception:  # noqa: BLE001 - only a head start: pack() meets any real problem and reports it
            pass

    def abandon(self, request_id: str) -> None:
        """The request's run was cancelled: stop tokenizing for it within a second, and record nothing more."""
        self._abandonments.abandon(request_id)

    def pack(self, request: PackRequest) -> PackedData | None:
        """The run's packed data; None for an abandoned request, whose run stopped waiting for the reply (raising
        there would only put an expected cancellation in the logs as an unhandled error)."""
        self._abandonments.started(request.request_id)
        try:
            return self._pack(request, lambda: self._abandonments.is_abandoned(request.request_id))
        except PreparationStopped:
            return None
        finally:
            self._abandonments.finished(request.request_id)

    def _pack(self, request: PackRequest, abandoned: Callable[[], bool]) -> PackedData:
        run, spec = request.run, request.run.spec
        sink = EventSink("data_packer", run.run_name)
        tokenizer = load_tokenizer(spec.model_path)
        common = dict(task_type=spec.task_type, model_path=spec.model_path, tokenizer=tokenizer,
                      context_length=spec.context_length, cache_dir=settings.load().packed_data_dir,
                      data_prep_cluster_id=spec.data_prep_cluster_id, stop_requested=abandoned, **on_cluster())
        train = prepare("train_data_path", spec.train_data_path,
                        progress=ProgressEvents(sink, "train_data_path"), **common)
        evaluation = (prepare("eval_data_path", spec.eval_data_path,
                              progress=ProgressEvents(sink, "eval_data_path"), **common)
                      if spec.eval_data_path else None)
        if abandoned():   # the rows are in the cache for a later run; this one has ended
            raise PreparationStopped(f"{run.run_name} was cancelled while its data was prepared")
        stats = train.stats
        sink.emit(
            EventType.DATA_VALIDATED,
            f"{stats['examples']} training examples → {stats['rows']} rows of {spec.context_length} tokens "
            f"({stats['packing_efficiency']:.1%} full, {stats['truncated_examples']} truncated)"
            + (" [cached]" if train.cached else ""),
            # The cache entries this run reads: `ray-finetune data cache --clear` keeps them while it is under way.
            {"train": stats, "eval": evaluation.stats if evaluation else None, "cached": train.cached,
             "packed_data": packed_data_id(train.rows_path),
             "packed_eval_data": packed_data_id(evaluation.rows_path) if evaluation else None},
        )
        return PackedData(train_rows_path=storage.location_of(train.rows_path), train_stats=stats,
                          eval_rows_path=storage.location_of(evaluation.rows_path) if evaluation else None,
                          eval_stats=evaluation.stats if evaluation else None)


def get_or_create() -> "ray.actor.ActorHandle":
    return one_per_cluster(DataPacker, ACTOR_NAME)
