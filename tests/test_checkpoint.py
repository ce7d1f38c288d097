"""Checkpoint safety without a cluster: a torn checkpoint is never chosen; retention keeps the newest N."""
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
    assert checkpoint.retain(tmp_path / "checkpoints", keep=1) == []


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
    removed = checkpoint.retain(tmp_path, keep=3)
    assert sorted(p.name for p in removed) == ["ep1-ba10", "ep2-ba20"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep3-ba30", "ep4-ba40", "ep5-ba50"]
