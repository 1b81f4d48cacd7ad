"""cluster.yaml against the cluster-launcher schema that ships inside the ray package, and against the
security properties a team deployment must keep (docs/explanation/security.md)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORLD = {"0.0.0.0/0", "::/0"}
RAY_DEFAULT_PROFILES = {"ray-autoscaler-v1", "ray-head-v1"}  # what Ray would create or attach otherwise


def _config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def security_findings(cfg: dict) -> list[str]:
    """Every way `cfg` falls short of the team deployment's security properties, one line each."""
    found = []
    group = cfg["provider"].get("security_group") or {}
    for perm in group.get("IpPermissions", []):
        ranges = {r.get("CidrIp") for r in perm.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in perm.get("Ipv6Ranges", [])
        }
        if ranges & WORLD:
            found.append(
                f"provider security group opens ports {perm.get('FromPort')}-{perm.get('ToPort')} to the world"
            )
    if not cfg["provider"].get("use_internal_ips"):
        found.append("nodes get public addresses (provider.use_internal_ips is not true)")
    for name, node_type in cfg["available_node_types"].items():
        nc = node_type["node_config"]
        if not nc.get("SecurityGroupIds"):
            # Ray then creates a group of its own and adds SSH from 0.0.0.0/0 to it.
            found.append(f"{name}: no SecurityGroupIds (Ray would create a group with SSH open to the world)")
        if not nc.get("SubnetIds"):
            found.append(f"{name}: no private SubnetIds")
        arn = (nc.get("IamInstanceProfile") or {}).get("Arn", "")
        if not arn or arn.rsplit("/", 1)[-1] in RAY_DEFAULT_PROFILES:
            found.append(f"{name}: no instance profile of its own (Ray's default role has full EC2 and S3)")
        if (nc.get("MetadataOptions") or {}).get("HttpTokens") != "required":
            found.append(f"{name}: IMDSv2 is optional (MetadataOptions.HttpTokens must be 'required')")
        for dev in nc.get("BlockDeviceMappings") or [{}]:
            if not (dev.get("Ebs") or {}).get("Encrypted"):
                found.append(f"{name}: volume {dev.get('DeviceName', '(root)')} is not encrypted")
    if not re.search(r"@sha256:\S+$", cfg["docker"]["image"]):
        found.append("docker image is not pinned by digest")
    start = " ".join(cfg["head_start_ray_commands"])
    if "--dashboard-host=127.0.0.1" not in start:
        found.append("dashboard and job API are not bound to the head's loopback address")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if "--object-spilling-directory=/mnt/ray-spill" not in " ".join(cfg[key]):
            found.append(f"{key}: the object store does not spill to the encrypted volume")
    mounts = [c for c in cfg["initialization_commands"] if "mount " in c and "/mnt/shared" in c]
    if not mounts or not all("-o tls" in c for c in mounts):
        found.append("EFS is not mounted with TLS")
    if "--env RAY_AUTH_MODE=token" not in cfg["docker"]["run_options"]:
        found.append("Ray token authentication is off")
    if not any("-c ~/ctvlab/constraints.txt" in c for c in cfg["setup_commands"]):
        found.append("ctvlab is installed without the pinned constraints")
    text = yaml.safe_dump(cfg)
    if re.search(r"(PASSWORD|TOKEN)=\S", text) or re.search(r"://[^/\s:]+:[^@\s]+@", text):
        found.append("a credential is written into the cluster config")
    return found


def test_cluster_yaml_matches_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_config(), schema)
    validate_config(prepare_config(_config()))  # Ray's own check, after it fills in its defaults


def test_cluster_yaml_keeps_every_security_property():
    assert security_findings(_config()) == []


def _set(path: str, value):
    def edit(cfg):
        *parents, last = path.split("/")
        node = cfg
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()
HEAD, WORKER = "available_node_types/head.cpu/node_config", "available_node_types/worker.gpu/node_config"


@pytest.mark.parametrize(
    ("edit", "finding"),
    [
        (_set("provider/security_group", {"GroupName": "g", "IpPermissions": [
            {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}),
         "to the world"),
        (_set(f"{WORKER}/SecurityGroupIds", _DELETE), "Ray would create a group"),
        (_set("provider/use_internal_ips", False), "public addresses"),
        (_set(f"{HEAD}/IamInstanceProfile", _DELETE), "no instance profile"),
        (_set(f"{WORKER}/IamInstanceProfile", {"Arn": "arn:aws:iam::1:instance-profile/ray-autoscaler-v1"}),
         "no instance profile"),
        (_set(f"{WORKER}/MetadataOptions", {"HttpTokens": "optional"}), "IMDSv2 is optional"),
        (_set(f"{HEAD}/BlockDeviceMappings", [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 200}}]),
         "not encrypted"),
        (_set("docker/image", "rayproject/ray:2.60.0-py311-gpu"), "not pinned by digest"),
        (_set("initialization_commands", ["sudo mount -t nfs4 fs-1.efs.aws:/ /mnt/shared"]), "not mounted with TLS"),
        (_set("setup_commands", ["pip install -e ~/ctvlab"]), "without the pinned constraints"),
        (_set("docker/run_options", ["--env RAY_AUTH_MODE=token", "--env MLFLOW_TRACKING_PASSWORD=hunter2"]),
         "credential"),
    ],
    ids=["ssh-world", "ray-made-group", "public-ips", "no-profile", "ray-default-role", "imdsv1",
         "unencrypted", "image-tag", "efs-plain", "unpinned", "password"],
)  # fmt: skip
def test_each_weakened_property_is_reported(edit, finding):
    cfg = copy.deepcopy(_config())
    edit(cfg)
    assert any(finding in f for f in security_findings(cfg)), security_findings(cfg)


def test_cluster_installs_this_checkout_and_tracks_to_mlflow():
    cfg = _config()
    assert cfg["file_mounts"] == {"~/ctvlab": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert (REPO / "constraints.txt").is_file()
    assert any("MLFLOW_TRACKING_URI=https://" in o for o in cfg["docker"]["run_options"])  # TLS to MLflow
    gpu = cfg["available_node_types"]["worker.gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and "-gpu" in cfg["docker"]["image"]


def test_make_test_installs_from_the_same_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    pins = dict(
        line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    assert pins["torch"] == "2.13.0" and pins["ray"] == "2.60.0"  # no CPU-only local version for the cluster
