"""Data preparation at scale: sources cut into shards that together hold every record exactly once, tokenization
spread over the Ray cluster giving the same rows as in one process, and packing whose memory does not grow with
the tokens of the dataset."""
from __future__ import annotations

import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_finetune.data import sources
from ray_finetune.data.formats import TokenizedExample
from ray_finetune.data.packing import PackedRows, pack_examples, pack_stream
from ray_finetune.data.prepare import prepare
from ray_finetune.data.tokenized import ExampleTable, to_arrays
from ray_finetune.train.models import load_tokenizer
from waiting import wait_until

record = st.fixed_dictionaries({"prompt": st.text(max_size=30), "response": st.text(min_size=1, max_size=30)})


@settings(max_examples=60, deadline=None)
@given(records=st.lists(record, max_size=25), blank_every=st.integers(0, 5), shard_bytes=st.integers(1, 400),
       trailing_newline=st.booleans())
def test_jsonl_shards_hold_every_line_exactly_once(records, blank_every, shard_bytes, trailing_newline):
    lines = []
    for i, item in enumerate(records):
        lines.append(json.dumps(item, ensure_ascii=False))
        if blank_every and i % blank_every == 0:
            lines.append("")   # blank lines are skipped wherever a shard boundary falls
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")
        source = sources.locate("train_data_path", str(path))
        shards = sources.plan_shards(source, shard_bytes)
        from_shards = [r for shard in shards for _, r in sources.read_shard_records(source, shard)]
    assert from_shards == records


def test_text_folders_and_datasets_are_cut_into_shards_in_order(tmp_path):
    import datasets

    for i in range(7):
        (tmp_path / "docs" / f"{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / f"{i % 2}" / f"doc{i}.txt").write_text(f"document {i} " * 20)
    folder = sources.locate("train_data_path", str(tmp_path / "docs"))
    shards = sources.plan_shards(folder, shard_bytes=300)
    assert len(shards) > 1 and [f for s in shards for f in s.files] == sources.text_files(folder)

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    dataset = sources.locate("train_data_path", f"{tmp_path}/ds/train")
    shards = sources.plan_shards(dataset, shard_bytes=100)
    assert len(shards) > 1
    assert [r for s in shards for _, r in sources.read_shard_records(dataset, s)] == rows


def conversations(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i} " + "word " * (i % 17)},
                          {"role": "assistant", "content": f"answer {i} " + "more " * (i % 23)}]}
            for i in range(count)]


def test_many_shards_pack_the_same_rows_as_one(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(120)))
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     context_length=96)
    one = prepare("train_data_path", str(data), cache_dir=tmp_path / "one", **arguments)
    many = prepare("train_data_path", str(data), cache_dir=tmp_path / "many", shard_bytes=1000, **arguments)
    assert len(list((tmp_path / "many").glob("*/work-*"))) == 0   # tokenized shards are removed once packed
    assert one.stats == many.stats and one.stats["examples"] == 120
    assert_same_rows(one.rows_path, many.rows_path)


def test_unchecked_data_fails_preparation_naming_the_malformed_record(tmp_path, tiny_model):
    """create(validate_inputs=False) queues data nobody has checked: the data packer still refuses a record of the
    wrong shape (here a tool call without its function's name, which formatting would index) with the file and
    line -- also from a shard that starts mid-file -- and packs nothing."""
    from ray_finetune.errors import ValidationError

    records = conversations(40)
    records[29]["messages"][1] = {"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     context_length=96)
    for shard_bytes in (sources.SHARD_BYTES, 500):
        with pytest.raises(ValidationError) as caught:
            prepare("train_data_path", str(data), cache_dir=tmp_path / f"cache{shard_bytes}", shard_bytes=shard_bytes,
                    **arguments)
        assert (caught.value.parameter, caught.value.file, caught.value.line) == ("train_data_path", str(data), 30)
        assert "tool call without function.name" in caught.value.problem
        assert "CHAT_COMPLETION record" in caught.value.expected
        assert not list((tmp_path / f"cache{shard_bytes}").rglob("*.npy"))


def assert_same_rows(first: str, second: str) -> None:
    a, b = PackedRows.load(first), PackedRows.load(second)
    for name in PackedRows.FIELDS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_tokenization_spreads_over_the_cluster_and_matches_one_process(cluster, tmp_path, tiny_model):
    import ray

    from ray_finetune.data.prepare import map_over_cluster

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(200)))
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     context_length=128, shard_bytes=2000)
    told: dict[str, list[tuple[int, int]]] = {"local": [], "spread": []}
    local = prepare("train_data_path", str(data), cache_dir=tmp_path / "local",
                    progress=lambda *counts: told["local"].append(counts), **arguments)
    spread = prepare("train_data_path", str(data), cache_dir=tmp_path / "spread", map_shards=map_over_cluster,
                     progress=lambda *counts: told["spread"].append(counts), **arguments)
    assert ray.is_initialized()
    assert spread.stats == local.stats and not spread.cached
    assert_same_rows(local.rows_path, spread.rows_path)
    # Progress is told from none to every shard, one shard at a time, whichever way it was tokenized.
    shards = spread.shards
    assert shards > 1 and told["local"] == told["spread"] == [(done, shards) for done in range(shards + 1)]


def test_continued_pretraining_across_shards_keeps_every_token(tmp_path, tiny_model):
    (tmp_path / "docs").mkdir()
    for i in range(9):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"text number {i} " * (5 + 7 * i))
    arguments = dict(task_type="CONTINUED_PRETRAIN", model_path=str(tiny_model),
                     tokenizer=load_tokenizer(tiny_model), context_length=64)
    one = prepare("train_data_path", str(tmp_path / "docs"), cache_dir=tmp_path / "one", **arguments)
    many = prepare("train_data_path", str(tmp_path / "docs"), cache_dir=tmp_path / "many", shard_bytes=200,
                   **arguments)
    assert one.stats == many.stats
    assert_same_rows(one.rows_path, many.rows_path)


def test_packing_memory_does_not_grow_with_the_tokens(tmp_path):
    """Shards on disk are memory-mapped and rows are written into files: what packing allocates is per-example
    bookkeeping, a small fraction of the tokens it moves."""
    rng = np.random.default_rng(0)
    prefixes = []
    for shard in range(4):
        lengths = rng.integers(20, 500, size=2000)
        examples = [TokenizedExample(rng.integers(3, 30000, size=n).tolist(), [False] * 5 + [True] * (n - 5))
                    for n in lengths]
        prefix = tmp_path / f"shard-{shard}"
        for name, array in to_arrays(examples, 512).items():
            np.save(f"{prefix}.{name}.npy", array)
        prefixes.append(str(prefix))
    table = ExampleTable.open(prefixes)
    tracemalloc.start()
    rows, stats = pack_examples(table, 512, pad_id=0, folder=tmp_path / "rows")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row_bytes = len(rows) * 512 * 4 * len(PackedRows.FIELDS)
    assert stats.examples == 8000 and stats.tokens == int(table.lengths.sum())
    assert peak < row_bytes / 10, f"packing allocated {peak / 1e6:.1f} MB for {row_bytes / 1e6:.1f} MB of rows"
    reloaded = PackedRows.load(tmp_path / "rows")
    assert int((reloaded.segment_ids >= 0).sum()) == stats.tokens

    tracemalloc.start()
    _, stream_stats = pack_stream(table, 512, pad_id=0, folder=tmp_path / "stream")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert stream_stats.tokens == int(table.lengths.sum()) and peak < row_bytes / 10


@settings(max_examples=30, deadline=None)
@given(good_before=st.integers(0, 40), shard_bytes=st.integers(5, 300))
def test_a_bad_line_in_any_shard_is_named_by_its_line_number(good_before, shard_bytes):
    from ray_finetune.errors import ValidationError

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text('{"prompt": "p", "response": "r"}\n' * good_before + "not json\n" + '{"prompt": "p"}\n' * 5)
        source = sources.locate("train_data_path", str(path))
        try:
            for shard in sources.plan_shards(source, shard_bytes):
                list(sources.read_shard_records(source, shard))
        except ValidationError as error:
            assert error.line == good_before + 1 and error.file == str(path.resolve())
        else:
            raise AssertionError("the bad line was not reported")


def test_a_run_tokenizing_a_large_dataset_says_how_far_it_has_got(monkeypatch):
    from actors import data_packer

    class Sink:
        def __init__(self) -> None:
            self.said: list[tuple[str, str, dict]] = []

        def emit(self, kind, message, payload):
            self.said.append((kind.value, message, payload))

    sink, clock = Sink(), [100.0]
    monkeypatch.setattr(data_packer.time, "monotonic", lambda: clock[0])
    progress = data_packer.ProgressEvents(sink, "train_data_path")
    for done, seconds in [(0, 1), (1, 4), (2, 6), (3, 1), (4, 12), (5, 30)]:
        clock[0] += seconds
        progress(done, 5)
    # At most one event per PROGRESS_EVERY_S (10 s), none once every shard is done (DATA_VALIDATED says so).
    assert sink.said == [
        ("DATA_PROGRESS", "tokenized 2 of 5 shards of train_data_path",
         {"parameter": "train_data_path", "shards_done": 2, "shards": 5}),
        ("DATA_PROGRESS", "tokenized 4 of 5 shards of train_data_path",
         {"parameter": "train_data_path", "shards_done": 4, "shards": 5}),
    ]



def test_a_preparation_waiting_for_cpus_stops_when_asked_and_leaves_nothing_behind(cluster, tmp_path, tiny_model):
    """A run cancelled while its tokenize tasks wait for CPUs that trainers hold: its preparation stops at once
    (it used to wait for a shard to finish first, keeping its work folder until then), cancels its tasks and
    removes its work folder; none of its tasks runs later."""
    import threading

    import ray

    from ray_finetune.data.prepare import PreparationStopped, map_over_cluster

    @ray.remote(num_cpus=int(ray.cluster_resources()["CPU"]))
    class EveryCpu:   # what a trainer group holding the whole machine looks like to Ray's scheduler
        def ready(self) -> bool:
            return True

    holder = EveryCpu.remote()
    ray.get(holder.ready.remote())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(2_000)))
    cache, cancelled, outcome = tmp_path / "cache", threading.Event(), []

    def preparation() -> None:
        try:
            prepare("train_data_path", str(data), task_type="CHAT_COMPLETION", model_path=str(tiny_model),
                    tokenizer=load_tokenizer(tiny_model), context_length=128, cache_dir=cache,
                    map_shards=map_over_cluster, shard_bytes=50_000, stop_requested=cancelled.is_set)
        except BaseException as error:   # noqa: BLE001 - handed to the test's thread
            outcome.append(error)

    thread = threading.Thread(target=preparation)
    thread.start()
    try:
        wait_until(lambda: list(cache.glob("*/work-*")), 60, "the preparation to start")
        cancelled.set()
        thread.join(timeout=120)
        assert not thread.is_alive(), "the preparation went on waiting for CPUs after it was asked to stop"
        assert len(outcome) == 1 and isinstance(outcome[0], PreparationStopped)
        assert not list(cache.glob("*/work-*"))
    finally:
        ray.kill(holder)
    time.sleep(3)   # the CPUs are free: a task that had not been cancelled would tokenize its shard now
    assert not list(cache.rglob("*.npy")) and not list(cache.glob("*/work-*"))


def test_a_shard_finishing_after_its_preparation_ended_does_not_bring_its_folder_back(tmp_path, tiny_model):
    from ray_finetune.data.tokenized import TokenizeJob

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(10)))
    source = sources.locate("train_data_path", str(data))
    (shard,) = sources.plan_shards(source, sources.SHARD_BYTES)
    removed = tmp_path / "work-removed" / "tokens"
    job = TokenizeJob(source, shard, "CHAT_COMPLETION", str(tiny_model), 128, str(removed))
    with pytest.raises(FileNotFoundError):
        job.run(load_tokenizer(tiny_model))
    assert not (tmp_path / "work-removed").exists()


def test_work_folders_of_preparations_whose_process_died_are_removed_by_the_next(tmp_path, tiny_model):
    """A data packer or a dry run killed while it tokenizes leaves its work folder (its clean-up never ran); the
    next preparation on the same host removes those of dead processes, and only those."""
    import socket
    import subprocess

    from ray_finetune.data.cache import remove_orphaned_work

    finished = subprocess.Popen(["true"])
    finished.wait()   # its pid now names no process
    host, cache = socket.gethostname(), tmp_path / "cache"
    dead = cache / "a" / f"work-{host}-{finished.pid}-0123abcd"
    living = cache / "a" / f"work-{host}-{os.getpid()}-4567abcd"                   # a preparation under way here
    elsewhere = cache / "b" / f"work-another-host-{finished.pid}-89abcdef"         # cannot be checked from here
    older = cache / "b" / "work-0123456789abcdef0123456789abcdef"                  # named by an earlier version
    for work in (dead, living, elsewhere, older):
        (work / "tokens").mkdir(parents=True)
        (work / "tokens" / "shard-00000.ids.npy").write_bytes(b"x" * 1000)

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(10)))
    prepare("train_data_path", str(data), task_type="CHAT_COMPLETION", model_path=str(tiny_model),
            tokenizer=load_tokenizer(tiny_model), context_length=96, cache_dir=cache)
    assert not dead.exists() and living.exists() and elsewhere.exists() and older.exists()
    assert remove_orphaned_work(cache) == []


def test_reusing_a_cache_entry_marks_it_used_and_only_idle_entries_not_in_use_are_removable(tmp_path, tiny_model):
    from ray_finetune.data import cache

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(10)))
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     cache_dir=tmp_path / "cache")
    first = prepare("train_data_path", str(data), context_length=96, **arguments)
    other = prepare("train_data_path", str(data), context_length=64, **arguments)
    day_ago = time.time() - 86400
    for prepared in (first, other):
        os.utime(Path(prepared.rows_path).parent / "stats.json", (day_ago, day_ago))
    again = prepare("train_data_path", str(data), context_length=96, **arguments)
    assert again.cached and again.rows_path == first.rows_path

    found = {e.key: e for e in cache.entries(tmp_path / "cache")}
    first_key, other_key = Path(first.rows_path).parent.name, Path(other.rows_path).parent.name
    assert set(found) == {first_key, other_key} and found[first_key].examples == 10
    assert time.time() - found[first_key].last_used.timestamp() < 60          # reused just now
    assert time.time() - found[other_key].last_used.timestamp() > 86000
    entries = list(found.values())
    assert cache.removable(entries, in_use=set()) == [found[other_key]]       # the one reused now stays
    assert cache.removable(entries, in_use={other_key}) == []
    assert cache.removable(entries, in_use=set(), unused_for_s=2 * 86400) == []
    cache.remove(tmp_path / "cache", found[other_key])
    assert [e.key for e in cache.entries(tmp_path / "cache")] == [first_key]
    assert prepare("train_data_path", str(data), context_length=64, **arguments).cached is False   # packed again


def test_incomplete_entries_are_listed_and_removable_once_quiet_unless_a_preparation_here_writes_them(tmp_path,
                                                                                                      tiny_model):
    """What a removal or a packer cut short leaves has no stats file: no run reads it, but it takes room, so `data
    cache` lists it and `--clear` removes it once nothing under it changed for an hour; a preparation under way on
    this host is never removed, one of another host's only once quiet (it cannot be checked from here)."""
    import shutil
    import socket

    from ray_finetune.data import cache

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(10)))
    folder = tmp_path / "cache"
    complete = prepare("train_data_path", str(data), task_type="CHAT_COMPLETION", model_path=str(tiny_model),
                       tokenizer=load_tokenizer(tiny_model), context_length=96, cache_dir=folder)
    rows = Path(complete.rows_path)
    host = socket.gethostname()
    cut_short = folder / "removal-cut-short"                                       # its rows, no stats
    shutil.copytree(rows, cut_short / "rows")
    preparing = folder / "being-packed" / f"work-{host}-{os.getpid()}-0123abcd"    # a preparation alive here
    elsewhere = folder / "packed-elsewhere" / "work-another-host-1234-4567abcd"    # another host's
    fresh = folder / "just-begun" / "work-another-host-99-89abcdef"
    for work in (preparing, elsewhere, fresh):
        (work / "tokens").mkdir(parents=True)
        (work / "tokens" / "shard-00000.ids.npy").write_bytes(b"x" * 1000)
    two_hours_ago = time.time() - 7200
    for quiet in (cut_short, preparing.parent, elsewhere.parent):
        for path in [quiet, *quiet.rglob("*")]:
            os.utime(path, (two_hours_ago, two_hours_ago))
    os.utime(rows.parent / "stats.json", (two_hours_ago, two_hours_ago))

    found = {e.key: e for e in cache.entries(folder)}
    assert set(found) == {rows.parent.name, "removal-cut-short", "being-packed", "packed-elsewhere", "just-begun"}
    assert [k for k, e in found.items() if e.complete] == [rows.parent.name]
    assert found["removal-cut-short"].bytes == cache.storage.size(rows) and found["removal-cut-short"].examples == 0
    assert abs(found["removal-cut-short"].last_used.timestamp() - two_hours_ago) < 5   # last changed, not now
    assert [k for k, e in found.items() if e.being_prepared] == ["being-packed"]
    removable = {e.key for e in cache.removable(list(found.values()), in_use={rows.parent.name})}
    assert removable == {"removal-cut-short", "packed-elsewhere"}
    assert {e.key for e in cache.removable(list(found.values()), in_use=set(), unused_for_s=3 * 3600)} == set()
    for key in removable:
        cache.remove(folder, found[key])
    assert {e.key for e in cache.entries(folder)} == {rows.parent.name, "being-packed", "just-begun"}


def test_rows_a_cut_short_removal_left_are_packed_again_not_used(tmp_path, tiny_model):
    """Removing an entry takes its stats first (it is no longer complete), then its rows; when the storage stops
    that half-way, the next preparation of the same data packs the rows again instead of taking what is left."""
    from ray_finetune.data import cache

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(10)))
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     cache_dir=tmp_path / "cache", context_length=96)
    first = prepare("train_data_path", str(data), **arguments)
    rows = PackedRows.load(first.rows_path)
    packed = {name: np.array(getattr(rows, name)) for name in PackedRows.FIELDS}
    (Path(first.rows_path).parent / cache.STATS_FILE).unlink()                 # as a removal cut short leaves it
    (Path(first.rows_path) / f"{PackedRows.FIELDS[-1]}.npy").unlink()
    again = prepare("train_data_path", str(data), **arguments)
    assert not again.cached and again.rows_path == first.rows_path
    repacked = PackedRows.load(again.rows_path)
    assert all((getattr(repacked, name) == packed[name]).all() for name in PackedRows.FIELDS)


def test_an_entry_whose_stats_file_is_damaged_is_packed_again(tmp_path, tiny_model):
    """A stats file that does not parse (a disk error, a hand edit) makes the entry incomplete, as one without it:
    the next preparation packs the data again rather than failing the run with a JSON error."""
    from ray_finetune.data import cache

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(10)))
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     cache_dir=tmp_path / "cache", context_length=96)
    first = prepare("train_data_path", str(data), **arguments)
    stats = Path(first.rows_path).parent / cache.STATS_FILE
    stats.write_text(stats.read_text()[:-7])
    assert [entry.complete for entry in cache.entries(tmp_path / "cache")] == [False]
    again = prepare("train_data_path", str(data), **arguments)
    assert not again.cached and again.rows_path == first.rows_path and again.stats == first.stats
    assert json.loads(stats.read_text()) == first.stats
    assert prepare("train_data_path", str(data), **arguments).cached


def test_a_malformed_record_found_by_a_task_on_the_cluster_fails_preparation_with_its_line(cluster, tmp_path,
                                                                                         tiny_model):
    """The same refusal as in one process, from a tokenize task: its error reaches the caller as it was raised."""
    from ray_finetune.data.prepare import map_over_cluster
    from ray_finetune.errors import ValidationError

    records = conversations(40)
    records[29]["messages"][1] = {"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValidationError) as caught:
        prepare("train_data_path", str(data), task_type="CHAT_COMPLETION", model_path=str(tiny_model),
                tokenizer=load_tokenizer(tiny_model), context_length=96, cache_dir=tmp_path / "cache",
                map_shards=map_over_cluster, shard_bytes=500)
    assert (caught.value.parameter, caught.value.file, caught.value.line) == ("train_data_path", str(data), 30)
    assert not list((tmp_path / "cache").glob("*/work-*"))
