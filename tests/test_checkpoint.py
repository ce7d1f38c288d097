"""Checkpoint safety without a cluster: a torn checkpoint is never chosen; retention keeps the newest N, clears what
interrupted attempts left, and never fails for what the storage refuses."""
from __future__ import annotations

from ray_finetune.train import checkpoint


def make(directory, name, complete=True):
    folder = directory / name
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"x")
    if complete:
        checkpoint.write_state(folder, {"step": int(name.split("ba")[1])})
    return folder


def test_the_pointer_wins_when_it_names_a_complete_checkpoint(tmp_path):
    make(tmp_path, "ep1-ba10")
    make(tmp_path, "ep2-ba20")
    (tmp_path / checkpoint.POINTER_NAME).write_text("ep1-ba10\n")
    assert checkpoint.latest_complete(tmp_path).name == "ep1-ba10"


def test_torn_checkpoints_are_never_chosen(tmp_path):
    assert checkpoint.latest_complete(tmp_path) is None
    make(tmp_path, "ep1-ba10")
    make(tmp_path, "ep2-ba20", complete=False)            # killed before its trainer state was written
    make(tmp_path, checkpoint.staging_name("ep3-ba30"))   # killed before it was renamed into place
    (tmp_path / checkpoint.POINTER_NAME).write_text("ep2-ba20\n")
    assert checkpoint.latest_complete(tmp_path).name == "ep1-ba10"


def test_no_checkpoint_is_found_where_a_file_stands_in_place_of_the_folder(tmp_path):
    """A broken or taken checkpoints folder means "nothing to resume from", so that the run starts and then says
    why it cannot write its checkpoints, instead of failing to look."""
    (tmp_path / "checkpoints").write_text("in the way")
    assert checkpoint.latest_complete(tmp_path / "checkpoints") is None
    assert checkpoint.retain(tmp_path / "checkpoints", keep=1) == checkpoint.Retention((), ())


def test_a_checkpoint_is_placed_then_pointed_at(tmp_path):
    make(tmp_path, checkpoint.staging_name("ep1-ba5"))
    final = checkpoint.place(tmp_path, "ep1-ba5")
    assert final.is_dir() and not (tmp_path / checkpoint.POINTER_NAME).exists()
    checkpoint.point(tmp_path, "ep1-ba5")
    assert (tmp_path / checkpoint.POINTER_NAME).read_text().strip() == "ep1-ba5"
    assert checkpoint.latest_complete(tmp_path) == final


def test_retention_keeps_the_newest(tmp_path):
    for step in (10, 20, 30, 40, 50):
        make(tmp_path, f"ep{step // 10}-ba{step}")
    retention = checkpoint.retain(tmp_path, keep=3)
    assert sorted(p.name for p in retention.removed) == ["ep1-ba10", "ep2-ba20"] and retention.refused == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep3-ba30", "ep4-ba40", "ep5-ba50"]


def test_retention_clears_what_interrupted_attempts_left_before_the_newest_checkpoint(tmp_path):
    """A torn checkpoint or a staging folder older than the newest complete checkpoint is what an interrupted
    attempt left (the run resumed from before it): it goes. One newer is kept (a resumed run writes it again)."""
    make(tmp_path, "ep1-ba10")
    make(tmp_path, "ep1-ba15", complete=False)
    make(tmp_path, checkpoint.staging_name("ep1-ba18"))
    make(tmp_path, "ep2-ba20")
    make(tmp_path, "ep3-ba30", complete=False)
    make(tmp_path, checkpoint.staging_name("ep3-ba35"))
    (tmp_path / checkpoint.POINTER_NAME).write_text("ep2-ba20\n")
    retention = checkpoint.retain(tmp_path, keep=5)
    assert sorted(p.name for p in retention.removed) == [".tmp-ep1-ba18", "ep1-ba15"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-ep3-ba35", "ep1-ba10", "ep2-ba20", "ep3-ba30", checkpoint.POINTER_NAME]


def test_a_removal_the_storage_refuses_is_reported_and_tried_again_at_the_next_retention(tmp_path, monkeypatch):
    """Retention never raises: the newest checkpoint is complete whatever an older one's removal meets. A removal
    cut short after the trainer state went leaves a torn checkpoint (never resumed from), which the next retention
    removes."""
    from ray_finetune import storage

    for step in (10, 20, 30):
        make(tmp_path, f"ep{step // 10}-ba{step}")
    remove, refusing = storage.remove, {"ep1-ba10"}

    def refused_for_some(path, first=()):
        for name in first:   # the trainer state goes, then the folder is refused: a removal cut short
            remove(path / name)
        if path.name in refusing:
            raise PermissionError(f"Access Denied: {path.name}")
        remove(path)

    monkeypatch.setattr(storage, "remove", refused_for_some)
    retention = checkpoint.retain(tmp_path, keep=1)
    assert [p.name for p in retention.removed] == ["ep2-ba20"]
    assert retention.refused == ("ep1-ba10: PermissionError: Access Denied: ep1-ba10",)
    assert (tmp_path / "ep1-ba10").is_dir() and not checkpoint.is_complete(tmp_path / "ep1-ba10")
    assert checkpoint.latest_complete(tmp_path).name == "ep3-ba30"

    refusing.clear()   # the storage lets it go now
    make(tmp_path, "ep4-ba40")
    retention = checkpoint.retain(tmp_path, keep=1)
    assert sorted(p.name for p in retention.removed) == ["ep1-ba10", "ep3-ba30"] and retention.refused == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep4-ba40"]
