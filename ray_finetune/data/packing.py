"""Packing: examples → fixed-length rows, documents kept apart.

Each row carries input_ids, labels (-100 where nothing is learned), position_ids that restart at every document,
and segment_ids (document index within the row, -1 for padding) from which the trainer builds an attention mask
that never crosses a document boundary.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ray_finetune.data.formats import TokenizedExample
from ray_finetune.data.tokenized import ExampleTable

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


def packed_data_id(rows_path: str | Path) -> str:
    """Which packed data a folder of rows written by prepare() holds: the name of its cache entry, a hash of the
    data's content, the tokenizer and the packing settings. Here, not in prepare, so that a trainer can name its
    data without importing Ray (the GPU benchmark runs the training loop on a machine without it)."""
    return Path(rows_path).parent.name


@dataclass(frozen=True)
class PackedRows:
    """Rows as int32 arrays; on disk a folder of .npy files that readers memory-map (rows are read by index)."""
    input_ids: np.ndarray      # [rows, context]
    labels: np.ndarray         # [rows, context], IGNORE_INDEX where nothing is learned
    position_ids: np.ndarray   # [rows, context], restarting at every document
    segment_ids: np.ndarray    # [rows, context], document index within the row, -1 for padding

    FIELDS = ("input_ids", "labels", "position_ids", "segment_ids")

    @staticmethod
    def file_of(folder: str | Path, field: str) -> Path:
        """Where a rows folder holds one field's array."""
        return Path(folder) / f"{field}.npy"

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def allocate(cls, rows: int, context_length: int, pad_id: int, folder: str | Path | None = None
                 ) -> "PackedRows":
        """Empty rows (all padding), in memory or as files under `folder` filled in place."""
        fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "segment_ids": -1}
        arrays = {}
        for name in cls.FIELDS:
            if folder is None:
                arrays[name] = np.full((rows, context_length), fill[name], dtype=np.int32)
            else:
                Path(folder).mkdir(parents=True, exist_ok=True)
                array = np.lib.format.open_memmap(cls.file_of(folder, name), mode="w+", dtype=np.int32,
                                                  shape=(rows, context_length))
                array[:] = fill[name]
                arrays[name] = array
        return cls(**arrays)

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in self.FIELDS:
            np.save(self.file_of(folder, name), getattr(self, name))

    def flush(self) -> None:
        for name in self.FIELDS:
            array = getattr(self, name)
            if isinstance(array, np.memmap):
                array.flush()

    @classmethod
    def is_whole(cls, folder: str | Path) -> bool:
        """Whether a rows folder holds every array (a removal cut short leaves some)."""
        return all(cls.file_of(folder, name).is_file() for name in cls.FIELDS)

    @classmethod
    def load(cls, folder: str | Path) -> "PackedRows":
        return cls(**{name: np.load(cls.file_of(folder, name), mmap_mode="r") for name in cls.FIELDS})

    def target_tokens(self, rows: Iterable[int]) -> int:
        return int((self.labels[list(rows)] != IGNORE_INDEX).sum())


def _place(rows: PackedRows, row: int, offset: int, segment: int, ids: np.ndarray, mask: np.ndarray) -> None:
    """One document (or piece of one) into a row. Token t predicts token t+1 of the same piece, when that one is
    a target; the last token of a piece predicts nothing."""
    n = len(ids)
    where = slice(offset, offset + n)
    rows.input_ids[row, where] = ids
    rows.labels[row, offset:offset + n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    rows.position_ids[row, where] = np.arange(n, dtype=np.int32)
    rows.segment_ids[row, where] = segment


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
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


def _length_stats(table: ExampleTable, context_length: int) -> PackingStats:
    stats = PackingStats(context_length=context_length, examples=len(table),
                         truncated_examples=int((table.lengths > context_length).sum()))
    buckets = 64 * 2 ** np.ceil(np.log2(np.maximum(table.lengths, 64) / 64)).astype(np.int64)
    for upper, count in zip(*np.unique(buckets, return_counts=True)):
        stats.length_histogram[f"<={int(upper)}"] = int(count)
    return stats


def _as_table(examples: ExampleTable | Iterable[TokenizedExample], context_length: int) -> ExampleTable:
    return examples if isinstance(examples, ExampleTable) else ExampleTable.from_examples(examples, context_length)


def pack_examples(examples: ExampleTable | Iterable[TokenizedExample], context_length: int, pad_id: int,
                  folder: str | Path | None = None) -> tuple[PackedRows, PackingStats]:
    """Chat and instruction data: truncate what is too long (counted), drop what has nothing left to learn,
    then best-fit pack. Rows are written one by one (into `folder` when given): memory holds the examples'
    lengths and row assignments, not their tokens."""
    table = _as_table(examples, context_length)
    stats = _length_stats(table, context_length)
    kept = np.flatnonzero(table.trainable > 0)
    stats.dropped_examples = len(table) - len(kept)
    lengths = np.minimum(table.lengths[kept], context_length)
    bins = best_fit(lengths.tolist(), context_length)
    rows = PackedRows.allocate(len(bins), context_length, pad_id, folder)
    for r, members in enumerate(bins):
        offset = 0
        for segment, member in enumerate(members):
            ids, mask = table.example(int(kept[member]))
            n = int(lengths[member])
            _place(rows, r, offset, segment, ids[:n], mask[:n])
            offset += n
    rows.flush()
    stats.rows = len(rows)
    stats.tokens = int(lengths.sum())
    stats.target_tokens = int(table.trainable[kept].sum())
    return rows, stats


def pack_stream(documents: ExampleTable | Iterable[TokenizedExample], context_length: int, pad_id: int,
                folder: str | Path | None = None) -> tuple[PackedRows, PackingStats]:
    """Continued pretraining: documents (each ending in EOS) concatenated and cut into rows. A document cut by a
    row boundary continues in the next row as its own segment, so attention still never crosses documents."""
    table = _as_table(documents, context_length)
    stats = _length_stats(table, context_length)
    stats.truncated_examples = 0   # nothing is cut off: long documents continue in the next row
    total = int(table.lengths.sum())
    row_count = -(-total // context_length)
    # The stream's last row can hold nothing to learn (a lone last token predicts nothing in its row): a step of
    # such rows would have no target to average its loss over. It is left out.
    if row_count and not _learns_from(table, (row_count - 1) * context_length):
        row_count -= 1
    rows = PackedRows.allocate(row_count, context_length, pad_id, folder)
    row, offset, segment = 0, 0, 0
    stats.target_tokens = 0
    for index in range(len(table)):
        ids, mask = table.example(index)
        start = 0
        while start < len(ids):
            if offset == context_length:
                row, offset, segment = row + 1, 0, 0
            if row == row_count:
                break
            taken = min(context_length - offset, len(ids) - start)
            _place(rows, row, offset, segment, ids[start:start + taken], mask[start:start + taken])
            stats.target_tokens += int(mask[start + 1:start + taken].sum())
            start, offset, segment = start + taken, offset + taken, segment + 1
    rows.flush()
    stats.rows = len(rows)
    stats.tokens = min(total, row_count * context_length)
    return rows, stats


def _learns_from(table: ExampleTable, position: int) -> bool:
    """Whether the documents' stream, from token `position` on, holds a target: a token predicted by the token
    before it in the same piece (a piece starts at `position` or at its document's start)."""
    end = int(table.lengths.sum())
    for index in range(len(table) - 1, -1, -1):
        start = end - int(table.lengths[index])
        _, mask = table.example(index)
        if mask[max(position - start, 0) + 1:].any():
            return True
        if start <= position:
            return False
        end = start
    return False
