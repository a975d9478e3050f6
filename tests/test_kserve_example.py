"""deploy/k8s/kserve: the server as a KServe InferenceService (a custom predictor speaking V2).

No KServe CRD schema is available offline, so the check is in two parts: the fields KServe adds to a
predictor (its ComponentExtensionSpec, as KServe 0.21's Python SDK lists them) are the only non-pod fields,
and everything else, being a Kubernetes PodSpec inlined, is validated strictly against the Kubernetes
schemas kubernetes-validate bundles. The probes and port are checked against the server's own routes.
"""

from __future__ import annotations

import copy
import functools
import subprocess

import kubernetes_validate
import pytest
import yaml

from app.server import Settings, create_app
from tests.helpers import K8S, KUBERNETES_VERSIONS, kubectl

KSERVE = K8S / "kserve"
SPEC_FIELDS = {"predictor", "transformer", "explainer", "canary", "tracing"}  # V1beta1InferenceServiceSpec
# V1beta1PredictorSpec's fields that are not PodSpec fields (KServe 0.21): replicas, autoscaling, routing.
PREDICTOR_FIELDS = {
    "annotations",
    "autoScaling",
    "batcher",
    "canaryTrafficPercent",
    "containerConcurrency",
    "deploymentStrategy",
    "labels",
    "logger",
    "maxReplicas",
    "minReplicas",
    "model",
    "scaleMetric",
    "scaleTarget",
    "storageUris",
    "timeout",
    "workerSpec",
}


@functools.cache
def inference_service() -> dict:
    result = subprocess.run([kubectl(), "kustomize", str(KSERVE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert [(doc["apiVersion"], doc["kind"]) for doc in docs] == [("serving.kserve.io/v1beta1", "InferenceService")]
    return docs[0]


def as_pod(predictor: dict) -> dict:
    spec = {key: value for key, value in predictor.items() if key not in PREDICTOR_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pixelcnn-predictor"}, "spec": spec}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_predictor_is_a_valid_pod_spec_plus_kserves_fields(version: str) -> None:
    service = inference_service()
    assert set(service["spec"]) <= SPEC_FIELDS
    predictor = service["spec"]["predictor"]
    kubernetes_validate.validate(as_pod(predictor), version, strict=True)
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Serverless")


def test_a_misspelt_pod_field_is_refused() -> None:
    predictor = copy.deepcopy(inference_service()["spec"]["predictor"])
    predictor["containers"][0]["readinesProbe"] = predictor["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(as_pod(predictor), KUBERNETES_VERSIONS[0], strict=True)


def test_probes_are_v2_health_routes_on_the_server_port() -> None:
    (container,) = inference_service()["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert [port["containerPort"] for port in container["ports"]] == [Settings().port]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {probe["port"] for probe in probes.values()} == {Settings().port}
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    served = create_app(Settings()).openapi()["paths"]
    assert {probe["path"] for probe in probes.values()} <= set(served)
