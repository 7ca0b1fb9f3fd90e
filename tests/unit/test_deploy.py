"""deploy/: every manifest validates against the Kubernetes schemas, and the files agree with the code."""

from __future__ import annotations

import json
import re
import subprocess
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
    assert {"deployment.yaml", "deployment-gpu.yaml", "service.yaml", "sidecar.yaml", "hpa.yaml", "pdb.yaml"} <= names


def all_documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in documents(path)]


def deployments() -> list[dict]:
    return [doc for doc in all_documents() if doc["kind"] == "Deployment"]


def _selects(selector: dict, doc: dict) -> bool:
    labels = doc["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


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


def _flag(container: dict, flag: str, default: float) -> float:
    args = container.get("args", [])
    return float(args[args.index(flag) + 1]) if flag in args else default


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_probes_use_the_health_port_and_names_and_the_pod_outlives_its_drain(name):
    doc = documents(ROOT / "deploy" / "kubernetes" / name)[0]
    (server,) = containers(doc)
    env = {e["name"]: e.get("value") for e in server.get("env", [])}
    health_port = int(env["DIFFUSERS_GRPC_HEALTH_PORT"])  # plaintext, so probes work when the API port is TLS
    assert {"name": "health", "containerPort": health_port} in server["ports"]
    for probe, service in (
        ("readinessProbe", "diffusion.v1.DiffusionService"),
        ("startupProbe", "diffusion.v1.DiffusionService"),
        ("livenessProbe", ""),
    ):
        assert server[probe]["grpc"] == {"port": health_port, "service": service}
    drain, grace = _flag(server, "--drain-seconds", 5), _flag(server, "--grace-seconds", 30)
    assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + grace
    assert _flag(server, "--max-connection-age-seconds", 0) > 0  # clients rebalance after a scale-out


def test_every_deployment_has_a_service_a_pdb_and_an_hpa():
    docs = all_documents()
    for deployment in deployments():
        name = deployment["metadata"]["name"]
        if name.startswith("app-"):  # the sidecar example: one app pod, its own business
            continue
        services = [d for d in docs if d["kind"] == "Service" and _selects(d["spec"]["selector"], deployment)]
        assert services, f"no Service reaches {name}"
        pdbs = [
            d
            for d in docs
            if d["kind"] == "PodDisruptionBudget" and _selects(d["spec"]["selector"]["matchLabels"], deployment)
        ]
        assert pdbs, f"no PodDisruptionBudget for {name}"
        hpas = [
            d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"]["name"] == name
        ]
        assert hpas and hpas[0]["spec"]["minReplicas"] >= 2, f"{name}: an HPA keeping 2 replicas, for the PDB"
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true"


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_pods_meet_pod_security_restricted(deployment):
    """The "restricted" profile of Pod Security Standards, plus a read-only root and no service-account token."""
    spec = deployment["spec"]["template"]["spec"]
    pod = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False
    assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in volume for volume in spec.get("volumes", []))
    for container in containers(deployment):
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert context.get("privileged", False) is False
        assert context.get("capabilities", {}).get("drop") == ["ALL"] and not context["capabilities"].get("add")
        assert context.get("runAsNonRoot", pod.get("runAsNonRoot")) is True
        assert context.get("runAsUser", pod.get("runAsUser", 1)) != 0
        seccomp = context.get("seccompProfile", pod.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost")
        assert context.get("readOnlyRootFilesystem") is True
        if "diffusers-grpc" in container["image"]:  # the store and the caches need somewhere to write
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/models", "/tmp"} <= mounts


# Pod Security "restricted" as checkov checks it, with the resource rules platform teams expect.
CHECKOV_CHECKS = [
    "CKV_K8S_16",  # not privileged
    "CKV_K8S_17",  # no host PID
    "CKV_K8S_18",  # no host IPC
    "CKV_K8S_19",  # no host network
    "CKV_K8S_20",  # allowPrivilegeEscalation false
    "CKV_K8S_22",  # read-only root filesystem
    "CKV_K8S_23",  # no root containers
    "CKV_K8S_25",  # no added capabilities
    "CKV_K8S_28",  # NET_RAW dropped
    "CKV_K8S_29",  # pod security context
    "CKV_K8S_30",  # container security context
    "CKV_K8S_31",  # seccomp RuntimeDefault
    "CKV_K8S_37",  # capabilities dropped
    "CKV_K8S_38",  # no service-account token where none is needed
    "CKV_K8S_39",  # no SYS_ADMIN
    "CKV_K8S_40",  # a high UID
    "CKV_K8S_10",  # CPU requests
    "CKV_K8S_11",  # CPU limits
    "CKV_K8S_12",  # memory requests
    "CKV_K8S_13",  # memory limits
]
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


def test_checkov_passes_the_restricted_profile_checks():
    assert CHECKOV.exists(), "checkov is installed by `make install` into .venv-checkov"
    command = [str(CHECKOV), "-d", str(ROOT / "deploy" / "kubernetes"), "--framework", "kubernetes"]
    result = subprocess.run(
        [*command, "--skip-download", "--check", ",".join(CHECKOV_CHECKS), "-o", "json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert result.returncode == 0 and not failed, failed
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed >= len(CHECKOV_CHECKS) * len(deployments()) // 2  # the checks really ran, on every Deployment


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


def test_dockerfile_runs_as_non_root_and_probes_the_health_port():
    """What it builds into the image is proven by tests/e2e/test_image.py; here the settings around it."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, flags=re.M)  # non-root
    health_port = re.search(r"DIFFUSERS_GRPC_HEALTH_PORT=(\d+)", text).group(1)
    assert f'"health", "--target", "127.0.0.1:{health_port}"' in text  # plaintext even when the API port is TLS
    assert re.search(r"^ARG TORCH_INDEX=.*/cpu$", text, flags=re.M)  # CPU by default
    assert (ROOT / ".dockerignore").exists() and not (ROOT / "deploy" / ".dockerignore").exists()
