"""Data preparation end to end: locate → read → format → pack, cached by content so a second run (or a resumed
run) on the same data does not tokenize again. Used by the data packer actor and by estimate()."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_finetune.data import formats, packing, sources
from ray_finetune.data.validation import COLUMNS

FORMAT_VERSION = 1   # bump when formatting or packing changes what rows contain


@dataclass(frozen=True)
class Prepared:
    rows_path: str
    stats: dict[str, Any]
    cached: bool


def pack_source(source: sources.DataSource, task_type: str, tokenizer: Any, context_length: int
                ) -> tuple[packing.PackedRows, packing.PackingStats]:
    if task_type == "CONTINUED_PRETRAIN":
        documents = (formats.format_document(tokenizer, sources.read_text(source, file))
                     for file in sources.text_files(source))
        return packing.pack_stream(documents, context_length, tokenizer.pad_token_id)
    examples = formats.examples_from_records(tokenizer, task_type, sources.read_records(source, COLUMNS[task_type]))
    return packing.pack_examples(examples, context_length, tokenizer.pad_token_id)


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
             str(FORMAT_VERSION)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def prepare(parameter: str, path: str, *, task_type: str, model_path: str, tokenizer: Any, context_length: int,
            cache_dir: Path, data_prep_cluster_id: str | None = None) -> Prepared:
    """Packed rows for one dataset, from the cache when the same data was packed the same way before."""
    source = sources.locate(parameter, path, data_prep_cluster_id)
    folder = cache_dir / cache_key(source, model_path, task_type, context_length)
    rows_file, stats_file = folder / "rows.npz", folder / "stats.json"
    if rows_file.exists() and stats_file.exists():
        return Prepared(str(rows_file), json.loads(stats_file.read_text()), cached=True)
    rows, stats = pack_source(source, task_type, tokenizer, context_length)
    folder.mkdir(parents=True, exist_ok=True)
    # Each file is written under a temporary name and renamed, so a reader never sees half of one; the stats file
    # goes last and is what marks the entry complete.
    temporary = folder / f"rows.{os.getpid()}.tmp.npz"
    rows.save(str(temporary))
    temporary.replace(rows_file)
    temporary_stats = folder / f"stats.{os.getpid()}.tmp"
    temporary_stats.write_text(json.dumps(stats.as_dict()))
    temporary_stats.replace(stats_file)
    return Prepared(str(rows_file), stats.as_dict(), cached=False)
