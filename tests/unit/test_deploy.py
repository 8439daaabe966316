"""deploy/: every manifest parses and matches its schema — the RayCluster against KubeRay's CRD
(../shared/data/kuberay/ray.io_rayclusters.yaml, see its SOURCE.md), the core kinds through the kubernetes
client's models — with no field the schema does not know (Kubernetes would drop it silently); and every
`tidal` command line in the manifests and the Dockerfile is one the CLI accepts."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes.client import ApiClient

from orchestrator.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD = ROOT.parent / "shared" / "data" / "kuberay" / "ray.io_rayclusters.yaml"
CORE_MODELS = {("v1", "Service"): "V1Service", ("v1", "Secret"): "V1Secret",
               ("apps/v1", "Deployment"): "V1Deployment", ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim"}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def unknown_fields(value, schema: dict, where: str = "") -> list[str]:
    """Paths in `value` that `schema` (an OpenAPI v3 structural schema) does not declare."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            if key in schema["properties"]:
                found += unknown_fields(sub, schema["properties"][key], f"{where}.{key}")
            elif "additionalProperties" not in schema:
                found.append(f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{where}[{i}]")
    return found


@pytest.fixture(scope="module")
def raycluster_schema() -> dict:
    if not CRD.exists():      # as the trace tests: the shared data lives beside the repository, never in it
        pytest.skip(f"KubeRay's CRD is not at {CRD} (../shared/data beside the repository)")
    crd = yaml.safe_load(CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def test_the_raycluster_matches_kuberays_crd_with_no_unknown_field(raycluster_schema):
    clusters = [d for _, d in documents() if d["kind"] == "RayCluster"]
    assert len(clusters) == 1
    cluster = clusters[0]
    jsonschema.validate(cluster, raycluster_schema)
    assert unknown_fields(cluster, raycluster_schema) == []
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "tidal-redis"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {50051, 8000}
    assert head["readinessProbe"] and head["livenessProbe"]
    assert {g["groupName"] for g in spec["workerGroupSpecs"]} == {"cpu", "gpu"}


def test_a_typo_in_a_manifest_is_caught(raycluster_schema):
    cluster = next(d for _, d in documents() if d["kind"] == "RayCluster")
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["headGroupSpec"]["rayStartParm"] = {}
    assert unknown_fields(broken, raycluster_schema) == [".spec.headGroupSpec.rayStartParm"]
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, raycluster_schema)


def test_the_core_kinds_parse_into_the_kubernetes_clients_models():
    client = ApiClient()
    kinds = []
    for name, doc in documents():
        if doc["kind"] == "RayCluster":
            continue
        model = CORE_MODELS[doc["apiVersion"], doc["kind"]]
        obj = client._ApiClient__deserialize(doc, model)       # the client's own deserializer: types and required
        assert client.sanitize_for_serialization(obj)["kind"] == doc["kind"], name
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["Deployment", "PersistentVolumeClaim", "Secret", "Service", "Service"]


def tidal_command_lines() -> list[str]:
    lines = []
    for _, doc in documents():
        for container in (doc.get("spec", {}).get("headGroupSpec", {}).get("template", {})
                          .get("spec", {}).get("containers", [])):
            for arg in container.get("args", []):
                lines += [m.group(0) for m in re.finditer(r"tidal serve[^&;]*", arg)]
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    lines.append(" ".join(cmd))
    return lines


def test_every_tidal_command_line_is_one_the_cli_accepts():
    lines = tidal_command_lines()
    assert len(lines) == 2
    for line in lines:
        argv = shlex.split(line.replace("$(REDIS_PASSWORD)", "secret"))
        assert argv[0] == "tidal"
        args = build_parser().parse_args(argv[1:])          # SystemExit on a flag it does not know
        assert args.command == "serve" and args.ray_address == "auto"


def test_the_dockerfile_builds_on_the_official_ray_image_and_pins_torch():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_TAG=2\.60\.\d+-py311-cpu$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_TAG\}$", text, re.M)
    assert '"torch==${TORCH_VERSION}"' in text and "ARG TORCH_VERSION=2.13.0" in text
    for package in ("instance", "migration", "orchestrator", "rpc", "proto"):
        assert f"COPY --chown=ray:users {package} ./{package}" in text, package


def test_the_kustomization_lists_every_manifest_and_retargets_both_images():
    k = yaml.safe_load((DEPLOY / "kuberay" / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in (DEPLOY / "kuberay").glob("*.yaml")
                                            if p.name != "kustomization.yaml")
    used = {c["image"].split(":")[0] for _, d in documents() if d["kind"] == "RayCluster"
            for group in [d["spec"]["headGroupSpec"], *d["spec"]["workerGroupSpecs"]]
            for c in group["template"]["spec"]["containers"]}
    assert used == {i["name"] for i in k["images"]} == {"tidal", "tidal-cuda"}
