"""Security: paths confined to allowed roots (no `..` or symlink escape), a head that refuses drivers without its
token, runs filtered by who created them. (SQL's read-only guarantees are in test_eventstore.py.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ray_finetune import spec
from ray_finetune.errors import ValidationError


@pytest.fixture()
def confined(tmp_path, monkeypatch, tiny_model, chat_data):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copytree(tiny_model, allowed / "model")
    shutil.copy(chat_data[0], allowed / "train.jsonl")
    monkeypatch.setenv("RAY_FINETUNE_ALLOWED_ROOTS", f"{allowed},s3://team-bucket/")
    return allowed


def resolve(model, train, **extra):
    return spec.resolve(model=str(model), train_data_path=str(train), register_to="main.secure", **extra)


def test_paths_inside_the_allowed_roots_are_accepted(confined):
    assert resolve(confined / "model", confined / "train.jsonl").train_data_path.endswith("train.jsonl")


def test_paths_outside_are_refused_even_through_dotdot_or_symlinks(confined, tmp_path, chat_data, tiny_model):
    with pytest.raises(ValidationError, match="train_data_path.*outside the allowed roots"):
        resolve(confined / "model", chat_data[0])
    shutil.copy(chat_data[0], tmp_path / "outside.jsonl")
    with pytest.raises(ValidationError, match="outside the allowed roots"):
        resolve(confined / "model", f"{confined}/../outside.jsonl")
    (confined / "escape.jsonl").symlink_to(chat_data[0])
    with pytest.raises(ValidationError, match="outside the allowed roots"):
        resolve(confined / "model", confined / "escape.jsonl")
    with pytest.raises(ValidationError, match="model.*outside the allowed roots"):
        resolve(tiny_model, confined / "train.jsonl")
    with pytest.raises(ValidationError, match="custom_weights_path.*outside the allowed roots"):
        resolve(confined / "model", confined / "train.jsonl", custom_weights_path=str(tmp_path / "elsewhere"))


def test_a_path_outside_the_roots_is_refused_before_anyone_looks_whether_it_exists(confined, tmp_path):
    from ray_finetune.data import sources

    for outside in (tmp_path / "elsewhere" / "secret.jsonl", tmp_path / "missing.jsonl"):
        if outside.name == "secret.jsonl":
            outside.parent.mkdir()
            outside.write_text("{}\n")
        with pytest.raises(ValidationError, match="outside the allowed roots"):
            sources.locate("train_data_path", str(outside))   # same answer whether it exists or not


def test_url_roots_are_prefixes(confined):
    from ray_finetune.access import check_allowed

    check_allowed("train_data_path", "s3://team-bucket/chat/train.jsonl")
    with pytest.raises(ValidationError, match="outside the allowed roots"):
        check_allowed("train_data_path", "s3://other-bucket/train.jsonl")


@pytest.mark.cluster
def test_a_driver_without_the_token_is_refused(cluster, tmp_path):
    import json

    address = json.loads((cluster.home / "head.json").read_text())["address"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="disabled",   # no token anywhere this driver can see
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")          # (Ray's switch to dial 127.0.0.1 as given)
    code = f"import ray; ray.init(address={address!r}, logging_level='ERROR')"
    refused = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0
    assert "Authentication" in refused.stderr or "Unauthenticated" in refused.stderr
    token = (cluster.home / "ray_auth_token")
    assert oct(token.stat().st_mode & 0o777) == "0o600"


@pytest.mark.cluster
def test_the_local_head_listens_on_loopback_only(cluster):
    """Every server of the head ray_finetune started (GCS, raylet, object manager, agents, idle workers) accepts
    connections from this machine only."""
    import psutil

    from ray_finetune import cluster as cluster_module

    address = cluster_module.local_head_address(cluster)
    port = address.rsplit(":", 1)[1]
    listening = []
    for process in cluster_module.head_processes(address):
        try:
            listening += [(c.laddr.ip, c.laddr.port, process.name())
                          for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    assert any(entry[1] == int(port) for entry in listening)   # the head's own GCS port is among them
    exposed = [entry for entry in listening if not is_loopback(entry[0])]
    assert not exposed, exposed


def is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)   # ::ffff:127.0.0.1 is IPv4 loopback on an IPv6 socket
    return (mapped or address).is_loopback


@pytest.mark.cluster
def test_runs_are_filtered_by_who_created_them(cluster, tiny_model, chat_data):
    from ray_finetune import foundation_model as fm

    run = fm.create(model=str(tiny_model), train_data_path=str(chat_data[0]), register_to="main.secure",
                    context_length=128, training_duration="1ba")
    fm.cancel([run.name])
    mine = fm.list(user_emails=[run.created_by])
    assert run.name in [r.name for r in mine]
    assert run.name not in [r.name for r in fm.list(user_emails=["someone-else@example.com"])]
