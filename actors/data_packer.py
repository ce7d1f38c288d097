"""The data packer actor: reads a run's data, formats it (template + loss mask) and packs it into rows."""
from __future__ import annotations

from pathlib import Path

import ray

from actors.event_sink import EventSink
from actors.messages import PackedData, PackRequest
from eventstore.schema import EventType
from ray_finetune import settings
from ray_finetune.data import formats, packing, sources
from ray_finetune.train.models import load_tokenizer


def pack_path(parameter: str, path: str, task_type: str, tokenizer, context_length: int
              ) -> tuple[packing.PackedRows, packing.PackingStats]:
    if task_type == "CONTINUED_PRETRAIN":
        documents = (formats.format_document(tokenizer, sources.read_text(parameter, file))
                     for file in sources.text_files(parameter, path))
        return packing.pack_stream(documents, context_length, tokenizer.pad_token_id)
    examples = formats.examples_from_records(tokenizer, task_type, sources.read_jsonl(parameter, path))
    return packing.pack_examples(examples, context_length, tokenizer.pad_token_id)


@ray.remote(num_cpus=1, max_restarts=0)
class DataPacker:
    def pack(self, request: PackRequest) -> PackedData:
        run, spec = request.run, request.run.spec
        tokenizer = load_tokenizer(spec.model_path)
        folder = settings.load().packed_data_dir / run.run_name
        folder.mkdir(parents=True, exist_ok=True)
        train_rows, train_stats = pack_path("train_data_path", spec.train_data_path, spec.task_type, tokenizer,
                                            spec.context_length)
        if len(train_rows) == 0:
            raise ValueError(f"train_data_path {spec.train_data_path!r} has nothing to train on after formatting")
        train_file = _save(train_rows, folder / "train.npz")
        eval_file, eval_stats = None, None
        if spec.eval_data_path:
            eval_rows, stats = pack_path("eval_data_path", spec.eval_data_path, spec.task_type, tokenizer,
                                         spec.context_length)
            eval_file, eval_stats = _save(eval_rows, folder / "eval.npz"), stats.as_dict()
        EventSink("data_packer", run.run_name).emit(
            EventType.DATA_VALIDATED,
            f"{train_stats.examples} training examples → {train_stats.rows} rows of {spec.context_length} tokens "
            f"({train_stats.packing_efficiency:.1%} full, {train_stats.truncated_examples} truncated)",
            {"train": train_stats.as_dict(), "eval": eval_stats},
        )
        return PackedData(train_rows_path=train_file, train_stats=train_stats.as_dict(),
                          eval_rows_path=eval_file, eval_stats=eval_stats)


def _save(rows: packing.PackedRows, path: Path) -> str:
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    temporary = path.with_name(path.stem + ".tmp.npz")
    rows.save(str(temporary))
    temporary.replace(path)
    return str(path)
