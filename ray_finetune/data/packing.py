"""Packing: examples → fixed-length rows, documents kept apart.

Each row carries input_ids, labels (-100 where nothing is learned), position_ids that restart at every document,
and segment_ids (document index within the row, -1 for padding) from which the trainer builds an attention mask
that never crosses a document boundary.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ray_finetune.data.formats import TokenizedExample

IGNORE_INDEX = -100


@dataclass
class PackingStats:
    examples: int = 0
    truncated_examples: int = 0
    dropped_examples: int = 0          # nothing left to learn after truncation
    tokens: int = 0                    # real tokens in the rows
    target_tokens: int = 0             # tokens the loss is taken on
    rows: int = 0
    context_length: int = 0
    length_histogram: dict[str, int] = field(default_factory=dict)

    @property
    def packing_efficiency(self) -> float:
        capacity = self.rows * self.context_length
        return self.tokens / capacity if capacity else 0.0

    def as_dict(self) -> dict[str, object]:
        histogram = dict(sorted(self.length_histogram.items(), key=lambda item: int(item[0][2:])))
        return {**self.__dict__, "length_histogram": histogram,
                "packing_efficiency": round(self.packing_efficiency, 4)}


@dataclass(frozen=True)
class PackedRows:
    input_ids: np.ndarray      # [rows, context] int64
    labels: np.ndarray         # [rows, context] int64
    position_ids: np.ndarray   # [rows, context] int64
    segment_ids: np.ndarray    # [rows, context] int32

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def save(self, path: str) -> None:
        np.savez(path, input_ids=self.input_ids, labels=self.labels, position_ids=self.position_ids,
                 segment_ids=self.segment_ids)

    @classmethod
    def load(cls, path: str) -> "PackedRows":
        with np.load(path) as data:
            return cls(data["input_ids"], data["labels"], data["position_ids"], data["segment_ids"])

    def target_tokens(self, rows: Iterable[int]) -> int:
        return int((self.labels[list(rows)] != IGNORE_INDEX).sum())


def _histogram_bucket(length: int) -> str:
    upper = 64
    while length > upper:
        upper *= 2
    return f"<={upper}"


def _segment_labels(example: TokenizedExample) -> list[int]:
    """Token t predicts token t+1 of the same document, when that one is a target."""
    ids, mask = example.input_ids, example.target_mask
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes to the fullest row it still fits in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free_keys: list[tuple[int, int]] = []   # (free space, bin index), sorted
    for index in order:
        length = lengths[index]
        position = bisect.bisect_left(free_keys, (length, -1))
        if position < len(free_keys):
            free, bin_index = free_keys.pop(position)
        else:
            free, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if free - length > 0:
            bisect.insort(free_keys, (free - length, bin_index))
    return bins


def _rows_from_segments(rows: list[list[TokenizedExample]], context_length: int, pad_id: int) -> PackedRows:
    shape = (len(rows), context_length)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segment_ids = np.full(shape, -1, dtype=np.int32)
    for r, segments in enumerate(rows):
        offset = 0
        for s, example in enumerate(segments):
            n = len(example)
            input_ids[r, offset:offset + n] = example.input_ids
            labels[r, offset:offset + n] = _segment_labels(example)
            position_ids[r, offset:offset + n] = np.arange(n)
            segment_ids[r, offset:offset + n] = s
            offset += n
    return PackedRows(input_ids, labels, position_ids, segment_ids)


def pack_examples(examples: Iterable[TokenizedExample], context_length: int, pad_id: int
                  ) -> tuple[PackedRows, PackingStats]:
    """Chat and instruction data: truncate what is too long (counted), then best-fit pack."""
    stats = PackingStats(context_length=context_length)
    kept: list[TokenizedExample] = []
    for example in examples:
        stats.examples += 1
        bucket = _histogram_bucket(len(example))
        stats.length_histogram[bucket] = stats.length_histogram.get(bucket, 0) + 1
        if len(example) > context_length:
            stats.truncated_examples += 1
            example = TokenizedExample(example.input_ids[:context_length], example.target_mask[:context_length])
        if example.target_count == 0:
            stats.dropped_examples += 1
            continue
        kept.append(example)
    bins = best_fit([len(e) for e in kept], context_length)
    rows = [[kept[i] for i in members] for members in bins]
    packed = _rows_from_segments(rows, context_length, pad_id)
    stats.rows = len(packed)
    stats.tokens = int((packed.segment_ids >= 0).sum())
    stats.target_tokens = int((packed.labels != IGNORE_INDEX).sum())
    return packed, stats


def pack_stream(documents: Iterable[TokenizedExample], context_length: int, pad_id: int
                ) -> tuple[PackedRows, PackingStats]:
    """Continued pretraining: documents (each ending in EOS) concatenated and cut into rows. A document cut by a
    row boundary continues in the next row as its own segment, so attention still never crosses documents."""
    stats = PackingStats(context_length=context_length)
    rows: list[list[TokenizedExample]] = [[]]
    free = context_length
    for document in documents:
        stats.examples += 1
        bucket = _histogram_bucket(len(document))
        stats.length_histogram[bucket] = stats.length_histogram.get(bucket, 0) + 1
        start = 0
        while start < len(document):
            if free == 0:
                rows.append([])
                free = context_length
            piece = slice(start, start + free)
            rows[-1].append(TokenizedExample(document.input_ids[piece], document.target_mask[piece]))
            taken = len(document.input_ids[piece])
            start += taken
            free -= taken
    rows = [row for row in rows if row]
    packed = _rows_from_segments(rows, context_length, pad_id)
    stats.rows = len(packed)
    stats.tokens = int((packed.segment_ids >= 0).sum())
    stats.target_tokens = int((packed.labels != IGNORE_INDEX).sum())
    return packed, stats
