"""cluster.yaml is a valid Ray cluster-launcher config that installs this project on GPU nodes."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


def load_cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_own_schema() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load_cluster(), schema)


def test_cluster_has_a_head_and_autoscaling_gpu_workers() -> None:
    cfg = load_cluster()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for name, t in types.items()
                 if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert cfg["max_workers"] >= max(t["max_workers"] for t in gpu_types)


def test_every_node_gets_the_project_installed() -> None:
    cfg = load_cluster()
    mount = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert mount, "the working tree must be mounted on the nodes"
    installs = [c for c in cfg["setup_commands"] if "pip install" in c and mount[0] in c]
    assert installs, f"no setup command installs {mount[0]}"


def test_readme_gives_the_commands_to_run_on_a_cluster() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Run on a cluster"):]
    for command in ("ray up cluster.yaml", "ray job submit", "concept-atlas build",
                    "ray down cluster.yaml"):
        assert command in section, command


def test_the_cluster_keeps_its_apis_private() -> None:
    """Token authentication on every node, the token shipped to each, no API on 0.0.0.0."""
    cfg = load_cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert "~/.ray/auth_token" in cfg["file_mounts"].values()
    assert "0.0.0.0" not in (REPO / "cluster.yaml").read_text()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Run on a cluster"):]
    for fact in ("RAY_AUTH_MODE=token", "8265", "6379", "security group", "ray dashboard"):
        assert fact in section, fact
