"""cluster.yaml is a valid Ray cluster-launcher configuration (checked against Ray's own schema)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "cluster.yaml"


def validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_schema():
    config = yaml.safe_load(CONFIG.read_text())
    validate(config)
    assert "ray_finetune" in " ".join(config["setup_commands"])
    assert any("RAY_FINETUNE_STORAGE" in c for c in config["worker_start_ray_commands"])


def test_the_schema_check_can_fail():
    config = yaml.safe_load(CONFIG.read_text())
    config["available_node_types"]["head"]["not_a_field"] = 1
    with pytest.raises(Exception):
        validate(config)
