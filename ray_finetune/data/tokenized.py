"""Tokenized shards: what one tokenizer worker writes for one shard of a source, and the table the packer reads
them through.

A shard on disk is four flat arrays: every example's token ids and target mask laid end to end, each example's
length, and how many of its tokens are learned within the context length. The packer memory-maps them, so
packing holds per-example numbers, never the tokens of a whole dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ray_finetune.data import formats, sources
from ray_finetune.data.formats import TokenizedExample
from ray_finetune.data.validation import COLUMNS, SHAPES

ARRAYS = ("ids", "mask", "lengths", "trainable")


def shard_examples(source: sources.DataSource, shard: sources.Shard, task_type: str, tokenizer: Any
                   ) -> Iterator[TokenizedExample]:
    if task_type == "CONTINUED_PRETRAIN":
        for file in shard.files:
            yield formats.format_document(tokenizer, sources.read_text(source, file))
    else:
        # Checked again as they are read: create(validate_inputs=False) queues data nobody has looked at
        records = sources.read_shard_records(source, shard, COLUMNS[task_type], SHAPES[task_type])
        yield from formats.examples_from_records(tokenizer, task_type, records)


def learned_within(mask: np.ndarray, context_length: int) -> int:
    """Tokens whose prediction is learned when the example is cut to the context: token t is predicted from
    the ones before it, so the first token never is."""
    return int(mask[1:context_length].sum())


def to_arrays(examples: Iterable[TokenizedExample], context_length: int) -> dict[str, np.ndarray]:
    ids, masks, lengths, trainable = [], [], [], []
    for example in examples:
        mask = np.asarray(example.target_mask, dtype=np.bool_)
        ids.append(np.asarray(example.input_ids, dtype=np.int32))
        masks.append(mask)
        lengths.append(len(mask))
        trainable.append(learned_within(mask, context_length))
    return {
        "ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
        "mask": np.concatenate(masks) if masks else np.zeros(0, np.bool_),
        "lengths": np.asarray(lengths, dtype=np.int64),
        "trainable": np.asarray(trainable, dtype=np.int64),
    }


def tokenize_shard(source: sources.DataSource, shard: sources.Shard, task_type: str, tokenizer: Any,
                   context_length: int, folder: Path) -> str:
    """Tokenize one shard into `folder`, which the preparation that asked for it created; returns the shard's file
    prefix. Memory: one shard's tokens. A shard that finishes after its preparation ended (cancelled; its folder
    removed) fails writing rather than create the folder again: nothing else would ever remove it."""
    arrays = to_arrays(shard_examples(source, shard, task_type, tokenizer), context_length)
    prefix = str(Path(folder) / f"shard-{shard.index:05d}")
    for name, array in arrays.items():   # each file complete or absent: written aside, then renamed
        temporary = f"{prefix}.{name}.{os.getpid()}.tmp.npy"
        np.save(temporary, array)
        os.replace(temporary, f"{prefix}.{name}.npy")
    return prefix


@dataclass(frozen=True)
class TokenizeJob:
    """Everything a worker anywhere in the cluster needs to tokenize one shard (it loads the tokenizer itself)."""
    source: sources.DataSource
    shard: sources.Shard
    task_type: str
    model_path: str
    context_length: int
    folder: str

    def run(self, tokenizer: Any = None) -> str:
        if tokenizer is None:
            from ray_finetune.train.models import load_tokenizer

            tokenizer = load_tokenizer(self.model_path)
        return tokenize_shard(self.source, self.shard, self.task_type, tokenizer, self.context_length,
                              Path(self.folder))


class ExampleTable:
    """Tokenized examples of one dataset, in source order, across shards (memory-mapped or in memory)."""

    def __init__(self, parts: list[dict[str, np.ndarray]]) -> None:
        self._ids = [part["ids"] for part in parts]
        self._masks = [part["mask"] for part in parts]
        lengths = [np.asarray(part["lengths"], dtype=np.int64) for part in parts] or [np.zeros(0, np.int64)]
        self.lengths = np.concatenate(lengths)
        self.trainable = np.concatenate([np.asarray(p["trainable"], np.int64) for p in parts] or [self.lengths])
        self._part = np.repeat(np.arange(len(lengths), dtype=np.int32), [len(x) for x in lengths])
        self._start = np.concatenate([np.cumsum(x) - x for x in lengths])   # offset within its shard

    @classmethod
    def open(cls, prefixes: list[str]) -> "ExampleTable":
        return cls([{name: np.load(f"{prefix}.{name}.npy", mmap_mode="r") for name in ARRAYS}
                    for prefix in prefixes])

    @classmethod
    def from_examples(cls, examples: Iterable[TokenizedExample], context_length: int) -> "ExampleTable":
        return cls([to_arrays(examples, context_length)])

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        part, start = self._part[index], self._start[index]
        end = start + self.lengths[index]
        return self._ids[part][start:end], self._masks[part][start:end]
