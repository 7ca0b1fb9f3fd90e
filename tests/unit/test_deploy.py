"""deploy/: every manifest validates against the Kubernetes schemas, and the files agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helpers import ROOT

from service.cli.serve_cmd import FLAGS
from service.config import env_name

KUBERNETES_VERSION = "1.33.0"  # native sidecars (restartPolicy: Always init containers) need >= 1.29
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
SERVE_FLAGS = {flag for flag, *_ in FLAGS} | {"--no-reflection"}
SERVE_ENV = {env_name(field) for _, field, *_ in FLAGS} | {env_name("tags"), env_name("reflection")}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def test_there_are_manifests():
    names = {p.name for p in MANIFESTS}
    assert {"deployment.yaml", "deployment-gpu.yaml", "service.yaml", "sidecar.yaml", "hpa.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path):
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_servers_use_only_real_flags_and_variables():
    for path in MANIFESTS:
        for doc in documents(path):
            for container in containers(doc):
                if "diffusers-grpc" not in container["image"]:
                    continue
                flags = {a for a in container.get("args", []) if a.startswith("--")}
                assert flags <= SERVE_FLAGS, f"{path.name}: unknown flags {flags - SERVE_FLAGS}"
                names = {e["name"] for e in container.get("env", []) if e["name"].startswith("DIFFUSERS_GRPC_")}
                assert names <= SERVE_ENV, f"{path.name}: unknown variables {names - SERVE_ENV}"


def test_probes_use_the_health_service_names():
    doc = documents(ROOT / "deploy" / "kubernetes" / "deployment.yaml")[0]
    (server,) = containers(doc)
    assert server["readinessProbe"]["grpc"]["service"] == "diffusion.v1.DiffusionService"
    assert server["startupProbe"]["grpc"]["service"] == "diffusion.v1.DiffusionService"
    assert server["livenessProbe"]["grpc"]["service"] == ""
    grace = float(server["args"][server["args"].index("--grace-seconds") + 1])
    assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def test_gpu_variant_asks_for_a_gpu():
    (server,) = containers(documents(ROOT / "deploy" / "kubernetes" / "deployment-gpu.yaml")[0])
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "cuda" in server["args"]


def test_sidecar_probes_the_socket_it_serves_on_inside_the_shared_volume():
    doc = documents(ROOT / "deploy" / "kubernetes" / "sidecar.yaml")[0]
    spec = doc["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    socket = sidecar["args"][sidecar["args"].index("--uds") + 1]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = sidecar[probe]["exec"]["command"]
        assert command[command.index("--uds") + 1] == socket
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    (app,) = spec["containers"]
    app_mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    assert socket.startswith(mounts["socket"] + "/") and app_mounts["socket"] == mounts["socket"]
    assert {"name": "socket", "emptyDir": {}} in spec["volumes"]
    assert any(e["value"] == f"unix:{socket}" for e in app["env"])


def test_hpa_names_its_custom_metric():
    doc = documents(ROOT / "deploy" / "kubernetes" / "hpa.yaml")[0]
    names = [m["pods"]["metric"]["name"] for m in doc["spec"]["metrics"] if m["type"] == "Pods"]
    assert names == ["diffusers_grpc_queue_depth"]
    from service.telemetry import Metrics

    exported = {metric.name for metric in Metrics().registry.collect()}
    assert "diffusers_grpc_queue_depth" in exported


def test_dockerfile_copies_files_that_exist_and_checks_health():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    assert re.search(r"^USER 10001$", text, flags=re.M)  # non-root
    assert "HEALTHCHECK" in text and '"diffusers-grpc", "health"' in text
    assert re.search(r"^ARG TORCH_INDEX=.*/cpu$", text, flags=re.M)  # CPU by default
