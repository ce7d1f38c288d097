"""The packed-data cache on RAY_FINETUNE_STORAGE: what it holds, and removing what no run needs any more.

prepare() writes one entry per dataset, tokenizer and packing settings: `<storage>/packed/<key>/rows/` and
`stats.json`, written last (an entry without it is not complete). Rows take 16 bytes a token, so a cluster that
trains on many datasets fills its storage unless someone removes entries. An entry's stats file is touched whenever
a preparation reuses it, so its modification time says when a run last asked for the data. A run records the
entries it trains and evaluates on in its DATA_VALIDATED event (`packed_data`, `packed_eval_data`); the entries of
runs not yet ended are never removed. Removing any other entry is safe: a run that needs it again (a resumed run
included) packs the same rows again, under the same key.

An entry without its stats file is incomplete: a preparation under way (its work folder `work-<host>-<pid>-<random>`
inside), or what a preparation or a removal cut short left (a packer killed mid-way, a `--clear` interrupted). No run
reads one; it is listed too (it takes room) and removed once nothing under it has changed for CUT_SHORT_AFTER_S and
no preparation on this host is writing it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ray_finetune import storage

STATS_FILE = "stats.json"
# An entry reused this recently may be on its way to a run whose DATA_VALIDATED event is not in the log yet.
RECENT_USE_S = 300.0
# An incomplete entry this quiet is not being written: a preparation writes its shards' files as each is tokenized
# (minutes apart at most) and then its rows, continuously. Its process cannot be checked from another host.
CUT_SHORT_AFTER_S = 3600.0


@dataclass(frozen=True)
class CacheEntry:
    key: str              # the folder's name, = packing.packed_data_id of its rows
    examples: int
    rows: int
    tokens: int
    bytes: int            # on disk
    last_used: datetime   # packed, or last reused by a preparation (UTC); of an incomplete entry: last changed
    complete: bool = True
    being_prepared: bool = False   # incomplete, and a preparation on this host is writing it


def entries(cache_dir: Path) -> list[CacheEntry]:
    """Every entry, complete or not, most recently used first (on object storage, the object store's times)."""
    found = []
    for key in storage.children(cache_dir):
        folder = cache_dir / key
        stats_file = folder / STATS_FILE
        try:
            stats, used = json.loads(storage.read_text(stats_file)), storage.modified(stats_file)
            complete = True
        except (OSError, ValueError):   # incomplete (or removed meanwhile, or its stats being replaced)
            stats, complete = {}, False
        try:
            if not complete:
                used = storage.modified(folder)
            size = storage.size(folder)
        except OSError:   # removed meanwhile
            continue
        found.append(CacheEntry(key=folder.name, examples=int(stats.get("examples", 0)), rows=int(stats.get("rows", 0)),
                                tokens=int(stats.get("tokens", 0)), bytes=size,
                                last_used=datetime.fromtimestamp(used, tz=timezone.utc), complete=complete,
                                being_prepared=not complete and any(
                                    _work_alive(work) for work in folder.glob("work-*"))))
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
    last RECENT_USE_S); incomplete ones once quiet for CUT_SHORT_AFTER_S, unless a preparation here writes them."""
    now = time.time() if now is None else now

    def idle_enough(entry: CacheEntry) -> bool:
        idle_for = max(unused_for_s, RECENT_USE_S if entry.complete else CUT_SHORT_AFTER_S)
        return now - entry.last_used.timestamp() >= idle_for

    return [entry for entry in found if entry.key not in in_use and not entry.being_prepared and idle_enough(entry)]


def remove(cache_dir: Path, entry: CacheEntry) -> None:
    """The stats file goes first: from then on the entry is incomplete, so a preparation packs the data again
    rather than read rows that are being removed."""
    storage.remove(cache_dir / entry.key, first=(STATS_FILE,))


def new_work_folder_name() -> str:
    """The folder a preparation works in, inside its entry: named for its host and process (see
    remove_orphaned_work)."""
    return f"work-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"


def remove_orphaned_work(cache_dir: Path) -> list[Path]:
    """Removes the work folders of preparations whose process died on this host (a data packer or a dry run killed
    in the middle, so that its own clean-up never ran), and returns them: each would otherwise keep a dataset's
    tokens on disk for good. Folders of other hosts are left to preparations there, or to `data cache --clear` once
    quiet (a process elsewhere cannot be checked from here), as are those named by earlier versions."""
    removed = []
    for work in cache_dir.glob("*/work-*"):
        if _work_alive(work) is False:
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


def _work_alive(work: Path) -> bool | None:
    """Whether the preparation writing `work` is alive; None when it cannot be told from here (another host's, or
    named by an earlier version)."""
    owner = work.name[len("work-"):].rpartition("-")[0]
    owner_host, _, pid = owner.rpartition("-")
    if owner_host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's: it exists
        return True
    return True


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
