"""cluster.yaml is a config Ray's cluster launcher accepts, with a CPU head, GPU workers, and
setup that installs ctrl-ray from the files it mounts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` sees it: merged with the AWS defaults, then schema-validated."""
    config = prepare_config(raw)
    validate_config(config)
    return config


def test_ray_accepts_the_aws_cluster_config(raw, prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] and prepared["provider"]["availability_zone"]
    assert prepared["auth"]["ssh_user"] == "ubuntu"
    # Everything we wrote survives the merge with Ray's defaults (no key silently replaced).
    for key in ("cluster_name", "max_workers", "head_node_type", "file_mounts",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == raw[key]


def test_cpu_head_and_gpu_workers(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    assert head["max_workers"] == 0
    workers = {name: spec for name, spec in types.items() if name != prepared["head_node_type"]}
    gpu_workers = {name: spec for name, spec in workers.items()
                   if spec["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker node type with GPU resources"
    for spec in gpu_workers.values():
        assert spec["resources"]["CPU"] >= 1 and spec["node_config"]["InstanceType"]
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= prepared["max_workers"]
    assert sum(spec["min_workers"] for spec in workers.values()) <= prepared["max_workers"]


def test_every_node_installs_ctrl_ray_from_the_mounted_source(raw, prepared):
    mounts = {remote: REPO / local for remote, local in raw["file_mounts"].items()}
    for local in mounts.values():
        assert local.exists(), f"file_mounts source {local} is missing"
    # What `pip install` of the package needs is mounted side by side.
    assert {"~/ctrl-ray/pyproject.toml", "~/ctrl-ray/README.md", "~/ctrl-ray/ctrl_ray"} <= set(
        mounts)
    assert all(not str(p.relative_to(REPO)).startswith((".venv", "data", "outputs"))
               for p in mounts.values())
    for kind in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[kind]
        torch = next(i for i, c in enumerate(commands) if re.search(r"pip install .*torch", c))
        package = next(i for i, c in enumerate(commands)
                       if re.search(r"pip install .*~/ctrl-ray\b", c))
        assert torch < package, f"{kind}: torch must be installed before ctrl-ray"
    assert any("boto3" in c for c in prepared["head_setup_commands"])


def test_start_commands_start_ray_and_point_jobs_at_mlflow(prepared):
    head = " && ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert "mlflow server" in head and "MLFLOW_TRACKING_URI=" in head
    worker = " && ".join(prepared["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker
    assert prepared["head_start_ray_commands"][0] == "ray stop"
