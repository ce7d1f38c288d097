"""The packed-data cache on RAY_FINETUNE_STORAGE: what it holds, and removing what no run needs any more.

prepare() writes one entry per dataset, tokenizer and packing settings: `<storage>/packed/<key>/rows/` and
`stats.json`, written last (an entry without it is not complete). Rows take 16 bytes a token, so a cluster that
trains on many datasets fills its storage unless someone removes entries. An entry's stats file is touched whenever
a preparation reuses it, so its modification time says when a run last asked for the data. A run records the
entries it trains and evaluates on in its DATA_VALIDATED event (`packed_data`, `packed_eval_data`); the entries of
runs not yet ended are never removed. Removing any other entry is safe: a run that needs it again (a resumed run
included) packs the same rows again, under the same key.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ray_finetune import storage

STATS_FILE = "stats.json"
# An entry reused this recently may be on its way to a run whose DATA_VALIDATED event is not in the log yet.
RECENT_USE_S = 300.0


@dataclass(frozen=True)
class CacheEntry:
    key: str              # the folder's name, = packing.packed_data_id of its rows
    examples: int
    rows: int
    tokens: int
    bytes: int            # on disk
    last_used: datetime   # packed, or last reused by a preparation (UTC)


def entries(cache_dir: Path) -> list[CacheEntry]:
    """The complete entries, most recently used first (on object storage, the object store's)."""
    found = []
    for key in storage.children(cache_dir):
        folder = cache_dir / key
        stats_file = folder / STATS_FILE
        try:
            stats, used = json.loads(storage.read_text(stats_file)), storage.modified(stats_file)
        except (OSError, ValueError):   # not complete, removed meanwhile, or being replaced
            continue
        size = storage.size(folder)
        found.append(CacheEntry(key=folder.name, examples=int(stats.get("examples", 0)), rows=int(stats.get("rows", 0)),
                                tokens=int(stats.get("tokens", 0)), bytes=size,
                                last_used=datetime.fromtimestamp(used, tz=timezone.utc)))
    return sorted(found, key=lambda entry: entry.last_used, reverse=True)


def mark_used(rows_path: str | Path) -> None:
    """A preparation reused the entry holding `rows_path` (on object storage its stats go up again: an object's
    time is when it was written)."""
    stats_file = Path(rows_path).parent / STATS_FILE
    stats_file.touch()
    storage.push(stats_file)


def removable(found: list[CacheEntry], in_use: set[str], unused_for_s: float = 0.0,
              now: float | None = None) -> list[CacheEntry]:
    """Entries no run under way trains on, unused for at least `unused_for_s` (and never the ones reused in the
    last RECENT_USE_S)."""
    now = time.time() if now is None else now
    idle_for = max(unused_for_s, RECENT_USE_S)
    return [entry for entry in found if entry.key not in in_use and now - entry.last_used.timestamp() >= idle_for]


def remove(cache_dir: Path, entry: CacheEntry) -> None:
    """The stats file goes first: from then on the entry is incomplete, so a preparation packs the data again
    rather than read rows that are being removed."""
    storage.remove(cache_dir / entry.key, first=(STATS_FILE,))


def drop_node_copies(location: str, keep: frozenset[str], now: float | None = None) -> int:
    """On one node: remove this node's mirror copies of the entries of the cache at `location` (on object storage)
    that are not in `keep` (the entries the object store still holds), and return the bytes freed. Trainers pull the
    rows they train on into their node's mirror, so removing an entry from the object store alone would leave a copy
    on every node that trained on it. A copy a preparation on this node is writing (a work folder inside it), or
    changed in the last RECENT_USE_S (one published, or pulled, just now), stays."""
    cache_dir = storage.local(location)
    if not storage.is_mirrored(cache_dir) or not cache_dir.is_dir():   # a shared folder is the cache itself
        return 0
    now = time.time() if now is None else now
    freed = 0
    for folder in cache_dir.iterdir():
        if folder.name in keep or not folder.is_dir() or any(folder.glob("work-*")):
            continue
        stats_file = folder / STATS_FILE
        changed = max(folder.stat().st_mtime, stats_file.stat().st_mtime if stats_file.exists() else 0.0)
        if now - changed < RECENT_USE_S:
            continue
        size = storage.size_here(folder)
        storage.drop_local(folder)
        freed += size
    return freed


def in_use_by_runs() -> dict[str, list[str]]:
    """Entry key -> the runs not yet ended that train or evaluate on it, from their DATA_VALIDATED events (connects
    to the cluster, as every reading of the event log does). Raises ConfigError when a run under way was validated
    by a version that did not record its entries: which entries it needs cannot be told."""
    from ray_finetune import events
    from ray_finetune.errors import ConfigError

    table = events.sql(
        "SELECT v.run_name, v.payload ->> '$.packed_data' AS train, v.payload ->> '$.packed_eval_data' AS eval "
        "FROM events v JOIN runs r ON r.run_name = v.run_name "
        "WHERE v.type = 'DATA_VALIDATED' AND r.status NOT IN ('COMPLETED', 'FAILED', 'STOPPED')")
    users: dict[str, list[str]] = {}
    for run_name, train, evaluation in table.itertuples(index=False):
        if train is None:
            raise ConfigError(f"run {run_name} is under way and its DATA_VALIDATED event does not name its packed "
                              "data (an earlier version validated it): remove cache entries once it has ended")
        for key in filter(None, (train, evaluation)):
            if run_name not in users.setdefault(key, []):
                users[key].append(run_name)
    return users
