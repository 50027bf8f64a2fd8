"""cluster.yaml (AWS) and cluster-local.yaml (own machines) are valid Ray cluster configs
(checked offline) that fit the sweeps run on them. tests/test_cluster_launch.py runs the local
one for real."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from clipray.config.loading import load_experiment
from clipray.core import storage

REPO = Path(__file__).resolve().parent.parent


FILES = ["cluster.yaml", "cluster-local.yaml"]


def _cluster(name: str = "cluster.yaml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", FILES)
def test_cluster_files_pass_rays_own_validation(name):
    config = prepare_config(copy.deepcopy(_cluster(name)))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("name", FILES)
def test_every_node_installs_the_project_and_the_head_listens_only_where_it_must(name):
    cluster = _cluster(name)
    assert cluster["file_mounts"]["~/clipray"] == "."
    assert "cd ~/clipray && python3 -m pip install -q -e ." in cluster["setup_commands"]
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # job submission: through the SSH tunnel only
    assert 'mlflow server --host "$ip"' in start and 'ip="$(hostname -I' in start
    assert "0.0.0.0" not in start


def test_both_files_install_and_start_the_same_way():
    aws, local = _cluster(), _cluster("cluster-local.yaml")
    assert set(local["setup_commands"]) <= set(aws["setup_commands"])  # AWS adds boto3 for S3
    assert local["worker_start_ray_commands"] == aws["worker_start_ray_commands"]
    assert local["rsync_exclude"] == aws["rsync_exclude"]
    assert len(local["head_start_ray_commands"]) == len(aws["head_start_ray_commands"])


def test_the_aws_cluster_adds_gpu_workers():
    cluster = _cluster()
    gpu_nodes = [t for t in cluster["available_node_types"].values() if t.get("max_workers")]
    assert gpu_nodes and cluster["max_workers"] >= max(t["max_workers"] for t in gpu_nodes)


def test_the_cluster_sweep_uses_storage_every_node_reaches():
    exp = load_experiment(REPO / "sweeps" / "cluster.yaml")
    assert storage.is_remote(exp.storage)
    assert exp.train.use_gpu == "yes" and exp.eval.scorers.gpus_per_actor > 0
    assert exp.eval.cache_dir is not None  # remote storage needs a per-node cache directory


VCPUS_GPUS = {"m6i.2xlarge": (8, 0), "g5.2xlarge": (8, 1)}  # AWS's published instance sizes


def test_the_cluster_sweep_fits_the_cluster_at_full_size():
    from clipray.sweep.runtime import check_resources

    cluster, have = _cluster(), {"CPU": 0.0, "GPU": 0.0}
    for node in cluster["available_node_types"].values():
        cpus, gpus = VCPUS_GPUS[node["node_config"]["InstanceType"]]
        count = max(1, node.get("max_workers", 0))  # the head: one
        have["CPU"], have["GPU"] = have["CPU"] + count * cpus, have["GPU"] + count * gpus
    exp = load_experiment(REPO / "sweeps" / "cluster.yaml")
    check_resources(exp, have, local=True)  # pool + every concurrent trial + its decode tasks
    trials = exp.sweep.max_concurrent_trials * exp.train.num_workers
    assert trials + exp.eval.scorers.num_actors * exp.eval.scorers.gpus_per_actor <= have["GPU"]
