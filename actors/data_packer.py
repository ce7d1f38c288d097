"""The data packer actor: reads a run's data, formats it (template + loss mask) and packs it into rows, reusing
packed rows cached from an earlier run on the same data. Tokenization is spread over the cluster: one Ray task
per shard of the source, each writing its tokens to shared storage."""
from __future__ import annotations

import time

import ray

from actors.event_sink import EventSink
from actors.messages import PackedData, PackRequest
from eventstore.schema import EventType
from ray_finetune import settings
from ray_finetune.data.prepare import on_cluster, prepare
from ray_finetune.train.models import load_tokenizer


# Tokenizing a large dataset takes minutes; a run that sits in STARTING says how far it has got this often.
PROGRESS_EVERY_S = 10.0


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
# from Ray's accounting so that on a small machine those tasks get every core.
@ray.remote(num_cpus=0, max_restarts=0)
class DataPacker:
    def pack(self, request: PackRequest) -> PackedData:
        run, spec = request.run, request.run.spec
        sink = EventSink("data_packer", run.run_name)
        tokenizer = load_tokenizer(spec.model_path)
        common = dict(task_type=spec.task_type, model_path=spec.model_path, tokenizer=tokenizer,
                      context_length=spec.context_length, cache_dir=settings.load().packed_data_dir,
                      data_prep_cluster_id=spec.data_prep_cluster_id, **on_cluster())
        train = prepare("train_data_path", spec.train_data_path, progress=ProgressEvents(sink, "train_data_path"),
                        **common)
        evaluation = (prepare("eval_data_path", spec.eval_data_path, progress=ProgressEvents(sink, "eval_data_path"),
                              **common) if spec.eval_data_path else None)
        stats = train.stats
        sink.emit(
            EventType.DATA_VALIDATED,
            f"{stats['examples']} training examples → {stats['rows']} rows of {spec.context_length} tokens "
            f"({stats['packing_efficiency']:.1%} full, {stats['truncated_examples']} truncated)"
            + (" [cached]" if train.cached else ""),
            {"train": stats, "eval": evaluation.stats if evaluation else None, "cached": train.cached},
        )
        return PackedData(train_rows_path=train.rows_path, train_stats=stats,
                          eval_rows_path=evaluation.rows_path if evaluation else None,
                          eval_stats=evaluation.stats if evaluation else None)
