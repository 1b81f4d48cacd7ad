"""cluster.yaml against the cluster-launcher schema that ships inside the ray package."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_config(), schema)
    validate_config(prepare_config(_config()))  # Ray's own check, after it fills in its defaults


def test_cluster_keeps_its_ports_private():
    cfg = _config()
    ranges = [r["CidrIp"] for p in cfg["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    ports = {(p["FromPort"], p["ToPort"]) for p in cfg["provider"]["security_group"]["IpPermissions"]}
    assert ports == {(22, 22)} and "0.0.0.0/0" not in ranges
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_cluster_installs_this_checkout_and_tracks_to_mlflow():
    cfg = _config()
    assert cfg["file_mounts"] == {"~/ctvlab": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]  # token auth on every node
    assert any("pip install" in c and "~/ctvlab" in c for c in cfg["setup_commands"])
    assert any("MLFLOW_TRACKING_URI=" in o for o in cfg["docker"]["run_options"])
    gpu = cfg["available_node_types"]["worker.gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and "gpu" in cfg["docker"]["image"]
