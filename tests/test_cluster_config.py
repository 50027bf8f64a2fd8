"""cluster.yaml is a valid Ray cluster config (checked offline) that fits the sweeps run on it."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from clipray.config.loading import load_experiment
from clipray.core import storage

REPO = Path(__file__).resolve().parent.parent


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_validation():
    config = prepare_config(copy.deepcopy(_cluster()))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


def test_every_node_installs_the_project_and_the_head_serves_mlflow():
    cluster = _cluster()
    assert cluster["file_mounts"]["~/clipray"] == "."
    assert any("pip install" in c and "-e ." in c for c in cluster["setup_commands"])
    assert any("mlflow server" in c and "0.0.0.0" in c for c in cluster["head_start_ray_commands"])
    gpu_nodes = [t for t in cluster["available_node_types"].values() if t.get("max_workers")]
    assert gpu_nodes and cluster["max_workers"] >= max(t["max_workers"] for t in gpu_nodes)


def test_the_cluster_sweep_uses_storage_every_node_reaches():
    exp = load_experiment(REPO / "sweeps" / "cluster.yaml")
    assert storage.is_remote(exp.storage)
    assert exp.train.use_gpu == "yes" and exp.eval.scorers.gpus_per_actor > 0
    assert exp.eval.cache_dir is not None  # remote storage needs a per-node cache directory
