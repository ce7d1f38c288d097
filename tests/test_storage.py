"""Object storage as RAY_FINETUNE_STORAGE (storage.py), against a real S3 server (moto's): the mirror mapping, the
transfers, and what checkpoints and packed data do on it. The whole path of a run over two nodes with a mirror each
is tested in test_multinode.py."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import fsspec
import pytest

from ray_finetune import storage
from ray_finetune.data import cache
from ray_finetune.data.prepare import prepare
from ray_finetune.errors import ConfigError, ValidationError
from ray_finetune.train import checkpoint
from ray_finetune.train.models import load_tokenizer


@pytest.fixture()
def mirror(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv(storage.MIRROR_ENV, str(tmp_path / "mirror"))
    return tmp_path / "mirror"


def test_a_url_and_its_mirror_path_name_each_other(mirror, tmp_path):
    path = storage.local("s3://bucket/team/run/checkpoints/")
    assert path == mirror / "s3" / "bucket" / "team" / "run" / "checkpoints"
    assert storage.location_of(path) == "s3://bucket/team/run/checkpoints" and storage.is_mirrored(path)
    assert storage.local(f"file://{tmp_path}/shared") == tmp_path / "shared"
    assert storage.location_of(tmp_path / "shared") == str(tmp_path / "shared")
    assert not storage.is_mirrored(tmp_path / "shared") and not storage.is_mirrored(mirror / "s3")


def test_a_folder_goes_up_whole_and_comes_down_whole(s3, mirror, monkeypatch):
    folder = storage.local("s3://training-data/team/piece")
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "shard.bin").write_bytes(b"\x00" * 1000)
    (folder / "done.json").write_text("{}")
    (folder / "early.json").write_text("{}")
    bucket, uploaded = fsspec.filesystem("s3"), []
    put_file = bucket._put_file

    async def recording(source, remote, **kw):
        await put_file(source, remote, **kw)
        uploaded.append(Path(remote).name)

    monkeypatch.setattr(bucket, "_put_file", recording)
    storage.push(folder, last=("done.json",))
    assert uploaded[-1] == "done.json" and len(uploaded) == 3   # what marks it complete goes up last, once the
    #                                                             others are all there
    assert storage.exists(folder / "done.json") and storage.children(folder) == ["deep", "done.json", "early.json"]
    assert storage.size(folder) == 1004
    shutil.rmtree(mirror)
    assert not folder.exists() and storage.exists(folder)   # the bucket is the truth; the mirror only a copy

    pulled: list[Path] = []
    threads = [threading.Thread(target=lambda: pulled.append(storage.pull(folder))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pulled == [folder] * 4   # ranks of one node pulling at once wait for the first download
    assert (folder / "deep" / "shard.bin").read_bytes() == b"\x00" * 1000 and (folder / "done.json").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".pull-")]   # no staging left

    storage.remove(folder)
    assert not folder.exists() and not storage.exists(folder) and storage.children(folder) == []
    with pytest.raises(FileNotFoundError, match="s3://training-data/team/piece does not exist"):
        storage.pull(folder)


def _stored_checkpoint(directory: Path, name: str, complete: bool = True) -> Path:
    folder = directory / name
    (folder / checkpoint.WEIGHTS_DIR).mkdir(parents=True)
    (folder / checkpoint.WEIGHTS_DIR / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / checkpoint.WEIGHTS_DIR / "model.safetensors").write_bytes(b"weights")
    if complete:
        checkpoint.write_state(folder, {"step": checkpoint.parse_name(name)[1]})
    storage.push(folder, last=(checkpoint.STATE_FILE,))
    shutil.rmtree(folder)   # written by another node: this one's mirror never held it
    return folder


def test_checkpoints_are_found_and_retired_in_the_bucket(s3, mirror):
    directory = checkpoint.checkpoints_dir("s3://training-data/artifacts/abc", "run-x")
    assert checkpoint.latest_complete(directory) is None
    _stored_checkpoint(directory, "ep0-ba2")
    _stored_checkpoint(directory, "ep0-ba4")
    _stored_checkpoint(directory, "ep0-ba6", complete=False)   # its trainer state never went up: torn
    assert checkpoint.latest_complete(directory) == directory / "ep0-ba4"
    (directory / checkpoint.POINTER_NAME).write_text("ep0-ba2\n")
    storage.push(directory / checkpoint.POINTER_NAME)
    (directory / checkpoint.POINTER_NAME).write_text("ep0-ba6\n")   # this node's stale copy is not asked
    assert checkpoint.latest_complete(directory) == directory / "ep0-ba2"
    assert checkpoint.read_state(directory / "ep0-ba4") == {"step": 4}

    pointer = "s3://training-data/artifacts/abc/run-x/checkpoints/latest-sharded-rank0.symlink"
    weights = checkpoint.weights_folder("custom_weights_path", pointer)
    assert weights == directory / "ep0-ba2" / checkpoint.WEIGHTS_DIR and not weights.exists()
    assert (storage.pull(weights) / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(ValidationError, match="pointer file .* does not exist"):
        checkpoint.weights_folder("custom_weights_path", pointer.replace("run-x", "run-y"))
    with pytest.raises(ValidationError, match="is not a checkpoint folder"):
        checkpoint.weights_folder("custom_weights_path", "s3://training-data/artifacts/abc/run-x/ep9-ba9")

    assert checkpoint.retain(directory, keep=1).removed == (directory / "ep0-ba2",)
    assert storage.children(directory) == ["ep0-ba4", "ep0-ba6", checkpoint.POINTER_NAME]


def test_packed_data_is_shared_through_the_bucket(s3, mirror, tiny_model, chat_data):
    cache_dir = storage.local("s3://training-data/team/packed")
    arguments = dict(task_type="CHAT_COMPLETION", model_path=str(tiny_model), tokenizer=load_tokenizer(tiny_model),
                     context_length=128, cache_dir=cache_dir)
    packed = prepare("train_data_path", str(chat_data[0]), **arguments)
    assert not packed.cached and storage.exists(Path(packed.rows_path).parent / cache.STATS_FILE)
    shutil.rmtree(mirror)   # another node: its mirror has none of it
    again = prepare("train_data_path", str(chat_data[0]), **arguments)
    assert again.cached and again.stats == packed.stats and Path(again.rows_path).is_dir()

    [entry] = cache.entries(cache_dir)
    assert entry.key == Path(packed.rows_path).parent.name and entry.rows == packed.stats["rows"] > 0
    assert entry.bytes > 0 and entry.complete
    # a removal cut short after the stats went: the rows stay in the bucket, listed as incomplete, and removable
    # once they have been there for an hour (the bucket's time of its newest object)
    storage.remove(Path(packed.rows_path).parent / cache.STATS_FILE)
    [left] = cache.entries(cache_dir)
    assert (left.key, left.complete, left.being_prepared) == (entry.key, False, False)
    assert left.bytes == storage.size(packed.rows_path) > 0 and abs(left.last_used.timestamp() - time.time()) < 60
    assert cache.removable([left], in_use=set()) == []
    assert cache.removable([left], in_use=set(), now=time.time() + cache.CUT_SHORT_AFTER_S + 60) == [left]
    cache.remove(cache_dir, left)
    assert cache.entries(cache_dir) == [] and storage.children(cache_dir) == []


def test_a_node_drops_its_copies_of_entries_the_bucket_no_longer_holds(mirror, tmp_path):
    """What trainers pulled into a node's mirror goes once the object store no longer holds it, unless a preparation
    on the node is writing it or it was pulled or published just now; on a shared folder nothing is a copy."""
    def entry(cache_dir, key, size, age_s, writing=False):
        rows = cache_dir / key / "rows"
        rows.mkdir(parents=True)
        (rows / "input_ids.npy").write_bytes(b"x" * size)
        if writing:
            (cache_dir / key / "work-host-1-abc").mkdir()
        then = time.time() - age_s
        os.utime(cache_dir / key, (then, then))

    location = "s3://training-data/team/packed"
    cache_dir = storage.local(location)
    entry(cache_dir, "held", 10, 3600)
    entry(cache_dir, "removed", 1000, 3600)
    entry(cache_dir, "pulled-just-now", 100, 5)
    entry(cache_dir, "being-packed", 100, 3600, writing=True)
    assert cache.drop_node_copies(location, frozenset({"held"})) == 1000
    assert sorted(p.name for p in cache_dir.iterdir()) == ["being-packed", "held", "pulled-just-now"]

    shared = tmp_path / "shared" / "packed"
    entry(shared, "removed", 1000, 3600)
    assert cache.drop_node_copies(str(shared), frozenset()) == 0 and (shared / "removed").is_dir()


def test_a_checkpoint_in_a_bucket_that_does_not_answer_is_refused_naming_the_parameter(monkeypatch, mirror, tiny_model):
    import s3fs

    from ray_finetune.data.validation import check_checkpoint

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ValidationError, match="custom_weights_path.*could not be read from here"):
        check_checkpoint("custom_weights_path", "s3://team/runs/x/checkpoints/ep1-ba2", tiny_model)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_node_reaches_the_storage_only_when_it_reads_the_identity_the_head_wrote(monkeypatch, tmp_path):
    """A shared folder: the head writes the storage's identity once; a node that sees the same folder reads it back,
    one whose path is a folder on its own disk (the share not mounted) or another share does not, and says so."""
    monkeypatch.setenv("RAY_FINETUNE_HOME", str(tmp_path / "home"))
    shared, unmounted, other = tmp_path / "shared", tmp_path / "unmounted", tmp_path / "other"
    written = storage.identity(shared)
    assert storage.identity(shared) == written and len(written) == 32   # written once, then read
    assert storage.unreached(shared, written) is None
    assert [f.name for f in shared.iterdir()] == [storage.IDENTITY_FILE]   # no staging or probe file left beside it
    unmounted.mkdir()
    assert storage.unreached(unmounted, written) == (f"{unmounted}/{storage.IDENTITY_FILE} is not there (on this "
                                                     "node's own disk)")
    storage.identity(other)
    assert "names another storage" in storage.unreached(other, written)
    assert storage.reach_advice(shared).startswith("Every node must mount the same shared folder, writable, at the "
                                                   "same path")
    assert "is its default, a folder under RAY_FINETUNE_HOME" in storage.reach_advice(tmp_path / "home" / "storage")


def test_the_identity_of_object_storage_lives_in_the_bucket_and_a_bucket_out_of_reach_names_the_setting(
        s3, mirror, monkeypatch):
    import s3fs

    root = storage.local("s3://training-data/team")
    written = storage.identity(root)
    assert s3.get_object(Bucket="training-data", Key=f"team/{storage.IDENTITY_FILE}")["Body"].read().decode().strip() \
        == written
    assert not (root / storage.IDENTITY_FILE).exists()   # the mirror keeps no copy a node could take for the truth
    assert storage.unreached("s3://training-data/team", written) is None   # as the head passes it: the URL
    assert s3.list_objects_v2(Bucket="training-data", Prefix="team/")["KeyCount"] == 1   # its write probe is gone
    assert [f.name for f in root.iterdir()] == []                                        # from the mirror too

    def read_only(path, to=None, last=()):   # credentials that may read the bucket and not write it
        raise PermissionError("Access Denied")

    with monkeypatch.context() as patched:
        patched.setattr(storage, "push", read_only)
        assert storage.unreached(root, written) == ("writing into s3://training-data/team failed: PermissionError: "
                                                    "Access Denied")
    assert [f.name for f in root.iterdir()] == []   # its local copy is not left in the mirror either
    assert storage.unreached("s3://training-data/elsewhere", written) == (
        f"s3://training-data/elsewhere/{storage.IDENTITY_FILE} is not there (on the object store this node's "
        "credentials reach)")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    assert storage.unreached(root, written).startswith(f"reading s3://training-data/team/{storage.IDENTITY_FILE} "
                                                       "failed: ")
    with pytest.raises(ConfigError, match=r"^RAY_FINETUNE_STORAGE=s3://training-data/team cannot be reached "
                                          "from the head node: "):
        storage.identity(root)
