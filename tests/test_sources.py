"""Every input form of the original API, each read for real: volume paths, file:// and s3:// (a real
S3-compatible server on loopback), Hugging Face datasets saved locally, Delta tables read with deltalake and
through a local Spark session; packed data cached by content."""
from __future__ import annotations

import json
import shutil

import pytest

from ray_finetune.data import sources, validation
from ray_finetune.data.prepare import prepare
from ray_finetune.errors import ValidationError
from ray_finetune.train.models import load_tokenizer

CHAT = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(10)]


def test_volume_paths_map_to_the_volumes_root(tmp_path, monkeypatch, chat_data):
    monkeypatch.setenv("RAY_FINETUNE_VOLUMES_ROOT", str(tmp_path / "volumes"))
    target = tmp_path / "volumes" / "main" / "default" / "raw" / "chat" / "train.jsonl"
    target.parent.mkdir(parents=True)
    shutil.copy(chat_data[0], target)
    for path in ("dbfs:/Volumes/main/default/raw/chat/train.jsonl", "/Volumes/main/default/raw/chat/train.jsonl"):
        assert validation.check_data("train_data_path", path, "CHAT_COMPLETION") == 24
    with pytest.raises(ValidationError, match="volume paths live under"):
        validation.check_data("train_data_path", "/Volumes/main/default/raw/missing.jsonl", "CHAT_COMPLETION")


def test_file_urls_and_text_folders(tmp_path, chat_data):
    assert validation.check_data("train_data_path", chat_data[0].as_uri(), "CHAT_COMPLETION") == 24
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first document")
    (tmp_path / "docs" / "deep" / "b.txt").write_text("second document")
    (tmp_path / "docs" / "skip.md").write_text("not text data")
    assert validation.check_data("train_data_path", (tmp_path / "docs").as_uri(), "CONTINUED_PRETRAIN") == 2


def test_s3_urls_read_from_a_real_s3_server(s3, tmp_path, tiny_model, chat_data):
    s3.upload_file(str(chat_data[0]), "training-data", "chat/train.jsonl")
    s3.put_object(Bucket="training-data", Key="docs/one.txt", Body=b"a document in a bucket")
    s3.put_object(Bucket="training-data", Key="bad/train.jsonl", Body=b'{"messages": []}\n')
    assert validation.check_data("train_data_path", "s3://training-data/chat/train.jsonl", "CHAT_COMPLETION") == 24
    assert validation.check_data("train_data_path", "s3://training-data/docs", "CONTINUED_PRETRAIN") == 1
    with pytest.raises(ValidationError, match="1 of 1 records are malformed"):
        validation.check_data("train_data_path", "s3://training-data/bad/train.jsonl", "CHAT_COMPLETION")
    with pytest.raises(ValidationError, match="does not exist"):
        validation.check_data("train_data_path", "s3://training-data/nope.jsonl", "CHAT_COMPLETION")
    tokenizer = load_tokenizer(tiny_model)
    from_s3 = prepare("train_data_path", "s3://training-data/chat/train.jsonl", task_type="CHAT_COMPLETION",
                      model_path=str(tiny_model), tokenizer=tokenizer, context_length=128, cache_dir=tmp_path)
    from_disk = prepare("train_data_path", str(chat_data[0]), task_type="CHAT_COMPLETION",
                        model_path=str(tiny_model), tokenizer=tokenizer, context_length=128, cache_dir=tmp_path)
    assert from_s3.stats == from_disk.stats


def test_an_unknown_protocol_says_what_to_install():
    with pytest.raises(ValidationError, match="fsspec implementation for nosuchproto://"):
        validation.check_data("train_data_path", "nosuchproto://bucket/x.jsonl", "CHAT_COMPLETION")


def test_hugging_face_datasets_saved_locally(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": f"p{i}", "response": f"r{i}", "id": i} for i in range(7)]),
        "test": datasets.Dataset.from_list([{"prompt": "p", "response": "r", "id": 0}]),
    }).save_to_disk(str(tmp_path / "acme-instructions"))
    path = f"{tmp_path}/acme-instructions/train"
    assert sources.locate("train_data_path", path).kind == "hf_dataset"
    assert validation.check_data("train_data_path", path, "INSTRUCTION_FINETUNE") == 7   # the id column is ignored
    assert validation.check_data("eval_data_path", f"{tmp_path}/acme-instructions/test", "INSTRUCTION_FINETUNE") == 1
    with pytest.raises(ValidationError, match="7 of 7 records are malformed .*pass task_type='INSTRUCTION_FINETUNE'"):
        validation.check_data("train_data_path", path, "CHAT_COMPLETION")   # the task type left at its default
    with pytest.raises(ValidationError, match="could not load Hugging Face dataset"):
        validation.check_data("train_data_path", f"{tmp_path}/acme-instructions/validation", "INSTRUCTION_FINETUNE")
    with pytest.raises(ValidationError, match="could not load Hugging Face dataset 'nobody/nothing'"):
        validation.check_data("train_data_path", "nobody/nothing/train", "INSTRUCTION_FINETUNE")


@pytest.fixture()
def hub_at(monkeypatch):
    """Points the Hugging Face hub endpoint somewhere else for one test, and forgets what was probed before."""
    from huggingface_hub import constants

    from ray_finetune.data import hub

    def point(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(hub, "_last_probe", None)
    return point


def test_with_the_hub_unreachable_a_dataset_not_cached_fails_at_once_saying_so(hub_at):
    """`datasets` alone retries an unreachable hub for ~25 s on every load; offline mode reads the cache only."""
    import datasets

    from ray_finetune.data import hub

    hub_at("http://127.0.0.1:9")   # nothing listens there
    assert not hub.reachable()
    with pytest.raises(ValidationError, match=r"could not load Hugging Face dataset 'acme/chats' split 'train' \(not "
                                              r"in the local HF cache, and the hub \(http://127.0.0.1:9\) does not "
                                              r"answer from here\)"):
        validation.check_data("train_data_path", "acme/chats/train", "CHAT_COMPLETION")
    assert datasets.config.HF_HUB_OFFLINE is False   # offline only for that load


def test_the_hub_counts_as_reachable_when_its_host_takes_a_connection(hub_at):
    import socket

    from ray_finetune.data import hub

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        hub_at(f"http://127.0.0.1:{port}")
        assert hub.reachable()
    hub_at(f"http://127.0.0.1:{port}")   # the same port, closed now
    assert not hub.reachable()
    hub_at("http://127.0.0.1:hub")   # HF_ENDPOINT mistyped: unreachable, not a traceback
    assert not hub.reachable()


@pytest.fixture()
def chat_table(tmp_path, monkeypatch):
    import pyarrow as pa
    from deltalake import write_deltalake

    monkeypatch.setenv("RAY_FINETUNE_CATALOG_ROOT", str(tmp_path / "catalog"))
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({"id": list(range(len(CHAT))),
                      "messages": pa.array([r["messages"] for r in CHAT], type=pa.list_(message))})
    write_deltalake(str(tmp_path / "catalog" / "main" / "default" / "chats"), table)
    return "main.default.chats"


def test_delta_tables_read_with_deltalake(chat_table, tmp_path, tiny_model):
    assert sources.locate("train_data_path", chat_table).kind == "delta_table"
    assert validation.check_data("train_data_path", chat_table, "CHAT_COMPLETION") == len(CHAT)
    with pytest.raises(ValidationError, match="every malformed record is well-formed CHAT_COMPLETION data"):
        validation.check_data("train_data_path", chat_table, "INSTRUCTION_FINETUNE")
    with pytest.raises(ValidationError, match="no Delta table 'main.default.missing'"):
        validation.check_data("train_data_path", "main.default.missing", "CHAT_COMPLETION")
    prepared = prepare("train_data_path", chat_table, task_type="CHAT_COMPLETION", model_path=str(tiny_model),
                       tokenizer=load_tokenizer(tiny_model), context_length=128, cache_dir=tmp_path / "cache")
    assert prepared.stats["examples"] == len(CHAT)


def test_a_delta_tables_weight_field_is_null_where_a_message_has_none(tmp_path, tiny_model, monkeypatch):
    """A struct column gives every message every field: the user messages' weights come back null, and only the
    assistant weights count (0 leaves that turn out of the loss)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    monkeypatch.setenv("RAY_FINETUNE_CATALOG_ROOT", str(tmp_path / "catalog"))
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int64())])
    tokenizer = load_tokenizer(tiny_model)
    targets = {}
    for name, weight in (("kept", 1), ("left_out", 0)):
        rows = [[{"role": "user", "content": "hi", "weight": None},
                 {"role": "assistant", "content": "hello there", "weight": weight},
                 {"role": "user", "content": "and then?", "weight": None},
                 {"role": "assistant", "content": "one two three", "weight": None}]] * 4
        write_deltalake(str(tmp_path / "catalog" / "main" / "default" / name),
                        pa.table({"messages": pa.array(rows, type=pa.list_(message))}))
        assert validation.check_data("train_data_path", f"main.default.{name}", "CHAT_COMPLETION") == 4
        targets[name] = prepare("train_data_path", f"main.default.{name}", task_type="CHAT_COMPLETION",
                                model_path=str(tiny_model), tokenizer=tokenizer, context_length=128,
                                cache_dir=tmp_path / name).stats["target_tokens"]
    assert 0 < targets["left_out"] < targets["kept"]


def test_delta_tables_read_through_a_local_spark_session(chat_table, tmp_path, tiny_model):
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("no Java runtime for a local Spark session")
    tokenizer = load_tokenizer(tiny_model)
    through_spark = prepare("train_data_path", chat_table, task_type="CHAT_COMPLETION", model_path=str(tiny_model),
                            tokenizer=tokenizer, context_length=128, cache_dir=tmp_path / "spark",
                            data_prep_cluster_id="local")
    direct = prepare("train_data_path", chat_table, task_type="CHAT_COMPLETION", model_path=str(tiny_model),
                     tokenizer=tokenizer, context_length=128, cache_dir=tmp_path / "direct")
    assert through_spark.stats == direct.stats and through_spark.stats["examples"] == len(CHAT)
    with pytest.raises(ValidationError, match="data_prep_cluster_id"):
        from ray_finetune.data.spark import check_cluster_id

        check_cluster_id("0123-456789-abcdef")


def test_packed_rows_are_cached_by_content(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     context_length=128, cache_dir=tmp_path / "cache")
    first = prepare("train_data_path", str(data), **arguments)
    again = prepare("train_data_path", str(data), **arguments)
    assert not first.cached and again.cached and again.rows_path == first.rows_path
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT[:5]))
    changed = prepare("train_data_path", str(data), **arguments)
    assert not changed.cached and changed.stats["examples"] == 5
    other_length = prepare("train_data_path", str(data), **{**arguments, "context_length": 64})
    assert not other_length.cached


def test_data_with_nothing_to_learn_is_refused_fresh_and_from_an_older_empty_cache_entry(tmp_path, tiny_model):
    """Every example's answer lies beyond context_length: refused naming the file, whether packed now or found as
    an empty entry that an earlier version had published to the cache."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "word " * 60},
                                                     {"role": "assistant", "content": "ok"}]}) + "\n"
                            for _ in range(3)))
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     context_length=32, cache_dir=tmp_path / "cache")
    message = "leaves nothing to train on: none of its 3 examples has a trained token within its first 32 tokens"
    with pytest.raises(ValidationError, match=message) as fresh:
        prepare("train_data_path", str(data), **arguments)
    assert fresh.value.file == str(data)
    assert not any((tmp_path / "cache").rglob("stats.json"))   # nothing published
    from ray_finetune.data.prepare import cache_key

    entry = tmp_path / "cache" / cache_key(sources.locate("train_data_path", str(data)), str(tiny_model),
                                           "CHAT_COMPLETION", 32)
    (entry / "rows").mkdir(parents=True)
    (entry / "stats.json").write_text(json.dumps({"rows": 0, "examples": 3}))
    with pytest.raises(ValidationError, match=message):
        prepare("train_data_path", str(data), **arguments)


def test_only_local_paths_are_anchored_to_the_working_directory(tmp_path, monkeypatch, chat_data):
    monkeypatch.chdir(tmp_path)
    shutil.copy(chat_data[0], tmp_path / "train.jsonl")
    assert sources.anchored("train.jsonl") == str(tmp_path / "train.jsonl")
    assert sources.anchored("./train.jsonl") == str(tmp_path / "train.jsonl")
    for left_as_written in ("org/name/train", "main.default.chats", "s3://bucket/train.jsonl",
                            "dbfs:/Volumes/main/default/raw/train.jsonl", "/Volumes/main/default/raw/train.jsonl",
                            "missing.jsonl"):
        assert sources.anchored(left_as_written) == left_as_written


def test_files_saved_by_windows_tools_read_like_any_other(tmp_path):
    """A UTF-8 byte-order mark and CRLF line ends (Notepad, PowerShell) are not content: the records and
    documents are the same as those of the plain file."""
    lines = [json.dumps(record) for record in CHAT]
    (tmp_path / "plain.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "windows.jsonl").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    read = {name: [record for _, record in sources.read_records(sources.locate("p", str(tmp_path / f"{name}.jsonl")))]
            for name in ("plain", "windows")}
    assert read["windows"] == read["plain"] == CHAT
    assert validation.check_data("train_data_path", str(tmp_path / "windows.jsonl"), "CHAT_COMPLETION") == len(CHAT)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes("\ufeffOnce upon a time.".encode())
    folder = sources.locate("p", str(tmp_path / "docs"))
    assert sources.read_text(folder, sources.text_files(folder)[0]) == "Once upon a time."


def test_a_delta_table_of_tool_calls_reads_with_its_nulls(tmp_path, monkeypatch):
    """Struct columns give every message every field: content is null on a tool-calling turn, tool_calls and
    tool_call_id are null where a message has none. They are checked and formatted as if absent."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from tiny_model import TOOLS_CHATML_TEMPLATE, build_tiny_model

    monkeypatch.setenv("RAY_FINETUNE_CATALOG_ROOT", str(tmp_path / "catalog"))
    call = pa.struct([("id", pa.string()), ("type", pa.string()),
                      ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call)),
                         ("tool_call_id", pa.string())])
    rows = [[{"role": "user", "content": "weather in rome?", "tool_calls": None, "tool_call_id": None},
             {"role": "assistant", "content": None, "tool_call_id": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "rome"}'}}]},
             {"role": "tool", "content": "20 degrees", "tool_calls": None, "tool_call_id": "c1"},
             {"role": "assistant", "content": "it is 20 degrees.", "tool_calls": None, "tool_call_id": None}]] * 3
    write_deltalake(str(tmp_path / "catalog" / "main" / "default" / "calls"),
                    pa.table({"messages": pa.array(rows, type=pa.list_(message))}))
    model = build_tiny_model(tmp_path / "tool-model", chat_template=TOOLS_CHATML_TEMPLATE)
    tokenizer = load_tokenizer(model)
    assert validation.check_data("train_data_path", "main.default.calls", "CHAT_COMPLETION", tokenizer=tokenizer) == 3
    prepared = prepare("train_data_path", "main.default.calls", task_type="CHAT_COMPLETION", model_path=str(model),
                       tokenizer=tokenizer, context_length=256, cache_dir=tmp_path / "cache")
    assert prepared.stats["examples"] == 3 and prepared.stats["dropped_examples"] == 0


def test_offline_loads_in_several_threads_leave_the_flags_as_they_found_them(hub_at):
    """The data packer loads in several threads at once. Each thread setting the flags back to what it saw on
    entry would leave offline mode on for good when the first one in leaves first (the second saw its flags)."""
    import socket
    import threading

    import datasets
    from huggingface_hub import constants

    from ray_finetune.data import hub

    second_inside, first_left = threading.Event(), threading.Event()

    def second() -> None:
        with hub.offline():
            second_inside.set()
            first_left.wait(10)

    with hub.offline():
        thread = threading.Thread(target=second)
        thread.start()
        assert second_inside.wait(10)
    first_left.set()
    thread.join(10)
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False
    with socket.create_server(("127.0.0.1", 0)) as server, hub.offline():
        # Inside another load's offline(), the user's own setting (online) counts, not the flag set for it.
        hub_at(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.reachable()
