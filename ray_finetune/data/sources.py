"""Where data comes from (SPEC §2), read as a stream of records or documents, never a whole file in memory:

- files and folders: local paths, any fsspec URL (file://, s3://, gs://, ... whatever protocol is installed),
  and volume paths dbfs:/Volumes/<catalog>/<schema>/<volume>/... (= /Volumes/...) under RAY_FINETUNE_VOLUMES_ROOT;
- Hugging Face datasets `[org/]name/split`, from a local dataset folder or the local HF cache;
- Delta tables `catalog.schema.table` under RAY_FINETUNE_CATALOG_ROOT, read with deltalake, or through Spark when
  a data_prep_cluster_id is given (`local` for an in-process session, or a Spark Connect URL sc://host:port).

Records come with a location ("line 12", "row 7") for error messages. A source can be cut into shards that
workers read independently (byte ranges of a JSONL file, row ranges of a dataset, groups of text files), so
tokenization spreads over a cluster without any worker holding the whole source.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple

from ray_finetune.access import check_allowed
from ray_finetune.errors import ValidationError, one_line

SourceKind = Literal["file", "folder", "hf_dataset", "delta_table"]
_TABLE = re.compile(r"^[A-Za-z_][\w-]*\.[A-Za-z_][\w-]*\.[A-Za-z_][\w-]*$")
_DATASET = re.compile(r"^(?:[\w.-]+/)?[\w.-]+/[\w.-]+$")
_VOLUME = re.compile(r"^(?:dbfs:)?/Volumes/(.+)$")
BATCH_ROWS = 1024
SHARD_BYTES = 32 << 20      # the most of a source one tokenizer worker takes at once (its memory)
MIN_SHARD_BYTES = 1 << 20   # the least worth a worker of its own: loading a tokenizer costs ~0.2 s


@dataclass(frozen=True)
class DataSource:
    parameter: str          # which create() argument named it, for error messages
    given: str              # what the user wrote
    kind: SourceKind
    url: str                # fsspec URL (file/folder), dataset id, or table name
    data_prep_cluster_id: str | None = None

    @property
    def where(self) -> str:
        """How error messages name it: a local path for local files, else the URL or name."""
        return self.url[len("file://"):] if self.url.startswith("file://") else self.url


def volumes_root() -> Path:
    from ray_finetune import settings

    return Path(os.environ.get("RAY_FINETUNE_VOLUMES_ROOT", str(settings.load().home / "volumes"))).expanduser()


def catalog_root() -> Path:
    from ray_finetune import settings

    return Path(os.environ.get("RAY_FINETUNE_CATALOG_ROOT", str(settings.load().home / "catalog"))).expanduser()


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by datasets' save_to_disk."""
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def anchored(path: str) -> str:
    """The same path, readable from any process: a local file or folder (or a saved dataset's split) named
    relative to this process's working directory, or from `~`, made absolute. The run's actors read it later,
    in the head's working directory, which is not the driver's. Anything else (URLs, volume paths, dataset and
    table names) is left as written."""
    if "://" in path or _VOLUME.match(path):
        return path
    local = Path(path).expanduser()
    if local.exists() or is_saved_dataset(local.parent):
        return os.path.abspath(local)
    return path


def _filesystem(parameter: str, url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        protocol = url.split("://", 1)[0]
        raise ValidationError(parameter, f"cannot open {url!r}: {error}",
                              expected=f"an installed fsspec implementation for {protocol}:// "
                                       "(e.g. pip install s3fs for s3://)") from None


def locate(parameter: str, path: str, data_prep_cluster_id: str | None = None) -> DataSource:
    """Decide what kind of source a user's path names; errors say what was looked for."""
    given = str(path).strip()
    volume = _VOLUME.match(given)
    # Confinement first: probing a path outside the allowed roots would tell whether it exists.
    if volume:
        check_allowed(parameter, volumes_root() / volume.group(1))
    elif "://" in given or Path(given).expanduser().is_absolute() or given.startswith("."):
        check_allowed(parameter, given if "://" in given else Path(given).expanduser())
    source = _locate(parameter, given, data_prep_cluster_id, volume)
    if source.kind in ("file", "folder"):
        check_allowed(parameter, source.url)
    elif source.kind == "hf_dataset" and Path(source.url).parent.is_dir():
        check_allowed(parameter, Path(source.url).parent)
    elif source.kind == "delta_table":
        check_allowed(parameter, table_path(source))
    return source


def _locate(parameter: str, given: str, data_prep_cluster_id: str | None, volume: re.Match | None) -> DataSource:
    if volume:
        url = (volumes_root() / volume.group(1)).resolve().as_uri()
    elif "://" in given:
        url = given
    else:
        local = Path(given).expanduser()
        if is_saved_dataset(local.parent):   # <folder written by save_to_disk>/<split>
            return DataSource(parameter, given, "hf_dataset", f"{local.parent.resolve()}/{local.name}")
        if local.exists():
            url = local.resolve().as_uri()
        elif _TABLE.match(given):
            return DataSource(parameter, given, "delta_table", given, data_prep_cluster_id)
        elif _DATASET.match(given) and not Path(given).suffix:
            return DataSource(parameter, given, "hf_dataset", given)
        else:
            raise ValidationError(parameter, f"{given!r} does not exist",
                                  expected="a local path, an fsspec URL (file://, s3://), a volume path "
                                           "(/Volumes/catalog/schema/volume/...), a Hugging Face dataset "
                                           "'[org/]name/split' or a Delta table 'catalog.schema.table'")
    fs, inner = _filesystem(parameter, url)
    try:
        exists, is_dir = fs.exists(inner), fs.isdir(inner)
    except Exception as error:  # noqa: BLE001 - a store that cannot be reached is the user's to fix
        raise ValidationError(parameter, f"cannot reach {url!r}: {one_line(error)}",
                              expected="a reachable location with read permission") from None
    if not exists:
        where = f" (volume paths live under {volumes_root()}; set RAY_FINETUNE_VOLUMES_ROOT)" if volume else ""
        raise ValidationError(parameter, f"{given!r} does not exist{where}", expected="an existing file or folder")
    return DataSource(parameter, given, "folder" if is_dir else "file", url)


# -- records (CHAT_COMPLETION, INSTRUCTION_FINETUNE) ----------------------------------------------------------------
@dataclass(frozen=True)
class UnreadableLine:
    """A JSONL line that is not UTF-8 or not JSON, for a reader that collects every problem of a file at once."""
    problem: str


class RecordShape(NamedTuple):
    """What a task type's records must look like (validation.SHAPES)."""
    problem_of: Callable[[Any], str | None]   # what is wrong with one record, or None
    expected: str                             # for the error message


def read_records(source: DataSource, columns: frozenset[str] | None = None, *,
                 unreadable_lines: bool = False, shape: RecordShape | None = None) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of a JSONL file, a dataset or a table. For datasets and tables only
    `columns` are kept (they often carry ids and metadata); a JSONL line is taken whole. A line that cannot be
    read raises, or with `unreadable_lines` comes as an UnreadableLine record. With `shape`, a record not of
    that shape raises."""
    if source.kind == "file":
        yield from _jsonl_records(source, unreadable_lines=unreadable_lines, shape=shape)
    elif source.kind in ("hf_dataset", "delta_table"):
        rows = _dataset_records(source) if source.kind == "hf_dataset" else _table_records(source)
        for location, row in rows:
            yield _shaped(source, shape, location, {k: v for k, v in row.items() if columns is None or k in columns})
    else:
        raise ValidationError(source.parameter, f"{source.given!r} is a folder",
                              expected="a .jsonl file, a Hugging Face dataset or a Delta table")


def _jsonl_records(source: DataSource, byte_range: tuple[int, int] | None = None, *,
                   unreadable_lines: bool = False, shape: RecordShape | None = None) -> Iterator[tuple[str, Any]]:
    """Every line of the file, or those starting inside byte_range; with `shape`, a record not of that shape
    raises (naming its line)."""
    if not source.url.endswith(".jsonl"):
        raise ValidationError(source.parameter, f"{source.given!r} is not a .jsonl file", file=source.where,
                              expected="a .jsonl file (one JSON object per line)")
    fs, inner = _filesystem(source.parameter, source.url)
    with fs.open(inner, "rb") as handle:
        start = byte_range[0] if byte_range else 0

        def line_number(index: int) -> int:   # a shard learns its first line's number only if it must name it
            return index + (_first_line_number(fs, inner, start) if start else 1)

        for index, (offset, raw) in enumerate(_lines(handle, byte_range)):
            location = f"line {index + 1}" if not start else f"the line at byte {offset}"
            try:
                # A byte-order mark starts files that Windows tools save as "UTF-8"; it is not part of the JSON.
                text = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
                if not text.strip():
                    continue
                record = json.loads(text)
            except UnicodeDecodeError as error:
                problem, expected = f"is not UTF-8 ({error.reason} at byte {error.start})", "UTF-8 text"
            except json.JSONDecodeError as error:
                problem = f"is not valid JSON ({error.msg} at column {error.colno})"
                expected = "one JSON object per line"
            else:
                problem = shape.problem_of(record) if shape is not None else None
                if problem is None:
                    yield location, record
                    continue
                expected = shape.expected
            if not unreadable_lines or shape is not None:   # only a reader without a shape collects problems
                raise ValidationError(source.parameter, problem, file=source.where, line=line_number(index),
                                      expected=expected)
            yield location, UnreadableLine(problem)


def _first_line_number(fs: Any, inner: str, start: int) -> int:
    """The number of the first line starting at or after byte `start` > 0: lines start at byte 0 and after each
    newline, and the shard begins after the newline at or after start - 1, so it is the newlines before
    start - 1, plus two. Reads the file up to `start`: only used to name a bad line."""
    newlines, remaining = 0, start - 1
    with fs.open(inner, "rb") as handle:
        while remaining > 0:
            block = handle.read(min(remaining, 1 << 20))
            if not block:
                break
            newlines += block.count(b"\n")
            remaining -= len(block)
    return newlines + 2


def _lines(handle: Any, byte_range: tuple[int, int] | None) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines of a binary file, whole or those that start inside [start, end)."""
    start, end = byte_range if byte_range is not None else (0, None)
    if start > 0:
        handle.seek(start - 1)
        handle.readline()   # the rest of the line that started before `start` belongs to the previous shard
    while True:
        offset = handle.tell()
        if end is not None and offset >= end:
            return
        raw = handle.readline()
        if not raw:
            return
        yield offset, raw


def _dataset_records(source: DataSource) -> Iterator[tuple[str, Any]]:
    name, _, split = source.url.rpartition("/")
    dataset = _load_dataset(source, name, split)
    for index, row in enumerate(dataset, start=1):
        yield f"row {index}", dict(row)


def _load_dataset(source: DataSource, name: str, split: str) -> Any:
    import datasets

    from ray_finetune.data import hub

    folder = Path(name).expanduser()
    saved = is_saved_dataset(folder)
    offline = not saved and not hub.reachable()
    try:
        if saved:
            loaded = datasets.load_from_disk(str(folder))   # written by save_to_disk
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        # Arrow files memory-mapped from the local cache: bounded memory without streaming from a hub.
        with hub.offline() if offline else contextlib.nullcontext():
            return datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; all mean "not available here"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if offline and isinstance(error, ConnectionError):   # what offline mode raises for a dataset not cached
            reason = f"not in the local HF cache, and the hub ({hub.endpoint()}) does not answer from here"
        raise ValidationError(source.parameter, f"could not load Hugging Face dataset {name!r} split {split!r} "
                              f"({reason})", expected="a dataset in the local HF cache (or reachable hub) with "
                                                     "that split, written '[org/]name/split'") from None


def table_path(source: DataSource) -> Path:
    catalog, schema, table = source.url.split(".")
    return catalog_root() / catalog / schema / table


def _table_records(source: DataSource) -> Iterator[tuple[str, Any]]:
    path = table_path(source)
    try:
        from deltalake import DeltaTable

        table = DeltaTable(str(path))
    except Exception as error:  # noqa: BLE001 - not a Delta table, whatever the reason
        raise ValidationError(source.parameter, f"no Delta table {source.url!r} at {path} ({type(error).__name__})",
                              expected="a Delta table under RAY_FINETUNE_CATALOG_ROOT/<catalog>/<schema>/<table>"
                              ) from None
    batches = (_spark_batches(source, table) if source.data_prep_cluster_id
               else table.to_pyarrow_dataset().to_batches(batch_size=BATCH_ROWS))
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            index += 1
            yield f"row {index}", row


def _spark_batches(source: DataSource, table: Any) -> Iterator[Any]:
    """Read the table's current snapshot through Spark (the data-prep cluster), streaming rows back."""
    import pyarrow as pa

    from ray_finetune.data.spark import session

    spark = session(source.data_prep_cluster_id or "local")
    frame = spark.read.parquet(*table.file_uris())
    rows: list[dict[str, Any]] = []
    for row in frame.toLocalIterator():
        rows.append(row.asDict(recursive=True))
        if len(rows) == BATCH_ROWS:
            yield pa.RecordBatch.from_pylist(rows)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows)


# -- shards: pieces of a source read independently -----------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    index: int
    byte_range: tuple[int, int] | None = None   # JSONL: the lines that *start* inside [start, end)
    row_range: tuple[int, int] | None = None    # dataset: rows [start, stop)
    files: tuple[str, ...] = ()                 # text folder: whole files


def plan_shards(source: DataSource, shard_bytes: int = SHARD_BYTES, parallelism: int = 1) -> list[Shard]:
    """Cut a source into pieces of at most about `shard_bytes`, and into at least `parallelism` pieces when it
    is big enough to be worth it (MIN_SHARD_BYTES each). Delta tables stay one piece: they are read through
    deltalake's or Spark's own parallel scan."""
    def count_for(size: int, units: int) -> int:
        wanted = max(-(-size // shard_bytes), min(parallelism, size // MIN_SHARD_BYTES))
        return max(1, min(wanted, units))

    if source.kind == "file":
        fs, inner = _filesystem(source.parameter, source.url)
        size = int(fs.size(inner))
        count = count_for(size, max(size, 1))
        bounds = [size * i // count for i in range(count + 1)]
        return [Shard(i, byte_range=(bounds[i], bounds[i + 1])) for i in range(count)]
    if source.kind == "folder":
        fs, _ = _filesystem(source.parameter, source.url)
        files = text_files(source)
        sizes = [int(fs.size(file)) for file in files]
        per_shard = sum(sizes) / count_for(sum(sizes), len(files))
        groups: list[list[str]] = [[]]
        filled = 0
        for file, size in zip(files, sizes):
            if groups[-1] and filled >= per_shard:
                groups.append([])
                filled = 0
            groups[-1].append(file)
            filled += size
        return [Shard(i, files=tuple(group)) for i, group in enumerate(groups)]
    if source.kind == "hf_dataset":
        name, _, split = source.url.rpartition("/")
        dataset = _load_dataset(source, name, split)
        rows = len(dataset)
        count = count_for(int(dataset.data.nbytes), rows)
        bounds = [rows * i // count for i in range(count + 1)]
        return [Shard(i, row_range=(bounds[i], bounds[i + 1])) for i in range(count)]
    return [Shard(0)]


def read_shard_records(source: DataSource, shard: Shard, columns: frozenset[str] | None = None,
                       shape: RecordShape | None = None) -> Iterator[tuple[str, Any]]:
    """The records of one shard, in source order; the shards of a source together hold every record once. With
    `shape`, a record not of that shape raises (data that create() was told not to check)."""
    if shard.byte_range is not None:
        yield from _jsonl_records(source, shard.byte_range, shape=shape)
    elif shard.row_range is not None:
        name, _, split = source.url.rpartition("/")
        dataset = _load_dataset(source, name, split).select(range(*shard.row_range))
        for index, row in enumerate(dataset, start=shard.row_range[0] + 1):
            yield _shaped(source, shape, f"row {index}",
                          {k: v for k, v in dict(row).items() if columns is None or k in columns})
    else:
        yield from read_records(source, columns, shape=shape)


def _shaped(source: DataSource, shape: RecordShape | None, location: str, record: Any) -> tuple[str, Any]:
    """(location, record) of a dataset's or table's row, or the error naming the row when it is not of `shape`."""
    problem = shape.problem_of(record) if shape is not None else None
    if problem:
        raise ValidationError(source.parameter, f"{location} {problem}", file=source.where, expected=shape.expected)
    return location, record


# -- documents (CONTINUED_PRETRAIN) -------------------------------------------------------------------------------
def text_files(source: DataSource) -> list[str]:
    """Every .txt file under a folder, recursively, in a stable order (fsspec paths)."""
    if source.kind != "folder":
        raise ValidationError(source.parameter, f"{source.given!r} is not a folder", file=source.where,
                              expected="a folder of .txt files for CONTINUED_PRETRAIN (the records of a .jsonl file, "
                                       "a dataset or a table train with task_type='CHAT_COMPLETION' or "
                                       "'INSTRUCTION_FINETUNE')")
    fs, inner = _filesystem(source.parameter, source.url)
    files = sorted(p for p in fs.find(inner) if p.endswith(".txt"))
    if not files:
        raise ValidationError(source.parameter, f"no .txt files under {source.given!r}", file=source.where,
                              expected="at least one .txt file (searched recursively)")
    return files


def read_text(source: DataSource, file: str) -> str:
    fs, _ = _filesystem(source.parameter, source.url)
    data = fs.cat_file(file)
    try:
        return data.decode("utf-8-sig")   # without a leading byte-order mark, which is not text
    except UnicodeDecodeError as error:
        raise ValidationError(source.parameter, f"is not UTF-8 (byte {error.start})", file=file,
                              expected="UTF-8 text") from None


# -- identity (for the packed-data cache) -------------------------------------------------------------------------
def fingerprint(source: DataSource) -> str:
    """Changes whenever the data could have changed: content hash for files, table version, dataset fingerprint."""
    digest = hashlib.sha256(source.url.encode())
    if source.kind == "file":
        fs, inner = _filesystem(source.parameter, source.url)
        with fs.open(inner, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    elif source.kind == "folder":
        fs, _ = _filesystem(source.parameter, source.url)
        for file in text_files(source):
            digest.update(file.encode())
            digest.update(fs.cat_file(file))
    elif source.kind == "delta_table":
        from deltalake import DeltaTable

        digest.update(str(DeltaTable(str(table_path(source))).version()).encode())
    else:
        name, _, split = source.url.rpartition("/")
        digest.update(str(_load_dataset(source, name, split)._fingerprint).encode())   # datasets' content hash
    return digest.hexdigest()
