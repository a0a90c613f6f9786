"""Static checks of the Kubernetes manifests in deploy/: the pieces must fit together.

No cluster needed: the YAML is parsed and cross-checked (selectors, ports, probes, scaling target, security,
resources, and the server settings against textgen's own parser). scripts/container_smoke.sh runs the image
the way the Deployment does (read-only root, uid 1034, BENTOML_HOME in /tmp).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from textgen.api.drain import EXIT_MARGIN_SECONDS
from textgen.config import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVER_PORT = 3000  # BentoML's port in the image (EXPOSE 3000)
BENTO_UID = 1034  # the uid of the user "bentoml" in BentoML's generated Dockerfile


def documents(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def only(name: str, kind: str) -> dict[str, Any]:
    found = [doc for doc in documents(name) if doc["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return only("deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def config_map() -> dict[str, Any]:
    return only("deployment.yaml", "ConfigMap")


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    return only("service.yaml", "Service")


@pytest.fixture(scope="module")
def hpa() -> dict[str, Any]:
    return only("hpa.yaml", "HorizontalPodAutoscaler")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A port given by number or by name, as the container's port number."""
    ports = container["ports"]
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in ports], f"port {port} is not a container port"
        return port
    named = [p["containerPort"] for p in ports if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return named[0]


def test_kinds_and_api_versions():
    kinds = {
        (doc["apiVersion"], doc["kind"])
        for name in ("deployment.yaml", "service.yaml", "hpa.yaml")
        for doc in documents(name)
    }
    assert kinds == {
        ("v1", "ConfigMap"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
    }


def test_deployment_selects_its_own_pods(deployment):
    match = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert match and match.items() <= labels.items()


def test_service_selects_the_deployments_pods(service, deployment):
    selector = service["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items(), (selector, labels)


def test_service_port_80_reaches_the_server(service, container):
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert container_port(container, port["targetPort"]) == SERVER_PORT


def test_probes_hit_readyz_and_livez_on_the_server_port(container):
    probes = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/livez",
        "startupProbe": "/livez",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(container, get["port"]) == SERVER_PORT, probe
        assert container[probe]["failureThreshold"] >= 3, probe
    # Liveness must not kill a pod that is still loading its model: a startup probe (or a long initial
    # delay) has to cover a slow start of several minutes.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_hpa_scales_the_deployment_on_cpu(hpa, deployment):
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100


def test_runs_as_the_images_non_root_user(deployment, container):
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    # The image's USER is a name, which the kubelet cannot verify as non-root: the uid must be given.
    assert pod["runAsUser"] == BENTO_UID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_resources_are_set_and_threads_match_the_cpu_limit(container, config_map):
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[kind].keys(), kind
    cpu_limit = resources["limits"]["cpu"]
    assert not str(cpu_limit).endswith("m"), "whole cores: TEXTGEN_THREADS is a whole number"
    assert int(config_map["data"]["TEXTGEN_THREADS"]) == int(cpu_limit)


def test_config_map_feeds_the_container_and_textgen_accepts_it(container, config_map):
    refs = [
        source["configMapRef"]["name"] for source in container.get("envFrom", []) if "configMapRef" in source
    ]
    assert refs == [config_map["metadata"]["name"]]
    data = config_map["data"]
    assert "MODEL_NAME" in data

    class Recording(dict):
        read: set[str] = set()

        def get(self, key, default=None):  # type: ignore[override]
            self.read.add(key)
            return super().get(key, default)

    env = Recording(data)
    Settings.from_env(env)  # raises ConfigError on a bad value
    unknown = {key for key in data if key.startswith("TEXTGEN_") or key == "MODEL_NAME"} - env.read
    assert not unknown, f"textgen does not read {sorted(unknown)}"


def test_writable_paths_are_volumes_when_the_root_is_read_only(container, config_map):
    """BentoML writes BENTOML_HOME at start-up and textgen its GGUF cache: both must be on a mounted volume."""
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = [m["mountPath"].rstrip("/") + "/" for m in container["volumeMounts"]]
    env = {e["name"]: e.get("value") for e in container["env"]}
    paths = {
        "BENTOML_HOME": env["BENTOML_HOME"],
        "TEXTGEN_CACHE_DIR": config_map["data"]["TEXTGEN_CACHE_DIR"],
    }
    for name, path in paths.items():
        assert any(
            (path.rstrip("/") + "/").startswith(m) for m in mounts
        ), f"{name}={path} is not on a volume"


def test_the_drain_fits_in_the_termination_grace_period(deployment, container, config_map):
    """preStop, then SIGTERM's drain (TEXTGEN_DRAIN_SECONDS), then the exit must end before the kubelet's
    SIGKILL: otherwise the requests the drain protects are cut anyway."""
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    drain = Settings.from_env(config_map["data"]).drain_seconds
    assert 0 < pre_stop and 0 < drain
    assert pre_stop + drain + EXIT_MARGIN_SECONDS <= grace, (pre_stop, drain, grace)
    # The default too: a ConfigMap without TEXTGEN_DRAIN_SECONDS still fits.
    assert pre_stop + Settings.from_env({}).drain_seconds + EXIT_MARGIN_SECONDS <= grace
