"""The Kubernetes manifests in deploy/ (read with PyYAML): the objects and their references, Qdrant's
cluster and its peer bootstrap run for every peer, the api Deployment and its probes on the real app,
and the ingest Job's arguments expanded as Kubernetes does for every completion index."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
import yaml
from fastapi.routing import iter_route_contexts

from tests.deploy_helpers import (
    DEPLOY,
    QDRANT_IMAGE,
    WORKLOADS,
    container_port,
    containers,
    dockerfile_uid,
    find,
    instructions,
    manifest_files,
    manifests,
    pod_spec,
    serve_keyed_app,
    settings_from,
    the_container,
)
from visrec.api import OPEN_PATHS, create_app
from visrec.config import Settings

JOB_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with serve_keyed_app(tmp_path_factory.mktemp("deploy")) as port:
        yield port


def get_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def configmap() -> dict[str, str]:
    return find("ConfigMap", "visrec-config")["data"]


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion in command, args and env values: $(VAR) for a VAR defined before, $$ -> $."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_]\w*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


def container_env(container: dict[str, Any], field_values: dict[str, str]) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom, then env in order, each expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = k8s_expand(str(item["value"]), env)
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = f"stand-in-{item['name'].lower()}"  # a Secret's value
    return env


def test_manifests_are_namespace_agnostic_objects() -> None:
    seen = set()
    for doc in manifests():
        assert doc.get("apiVersion") and doc.get("kind"), doc["_file"]
        assert doc.get("metadata", {}).get("name"), f"{doc['_file']}: {doc['kind']} without a name"
        assert "namespace" not in doc["metadata"], f"{doc['_file']}: set the namespace when applying"
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == {p.name for p in manifest_files()}, "kustomization.yaml and deploy/ disagree"
    image_names = {image["name"] for image in kustomization.get("images", [])}
    for kind in WORKLOADS:
        for workload in (d for d in manifests() if d["kind"] == kind):
            for container in containers(workload, init=True):
                name = container["image"].split(":")[0]
                assert name in image_names or QDRANT_IMAGE.match(container["image"]), container["image"]


@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="needs kubectl to build deploy/ with kustomize; scripts/test.sh does not install it (not in "
    "Debian): the manifests are still checked one by one above",
)
def test_kustomize_builds() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in manifests()
    )
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    (visrec_image,) = kustomization["images"]
    expected = f"{visrec_image['newName']}:{visrec_image['newTag']}"
    job = next(d for d in built if d["kind"] == "Job")
    assert {c["image"] for c in containers(job, init=True)} == {expected}


def test_qdrant_statefulset_runs_a_cluster() -> None:
    sts = find("StatefulSet", "qdrant")
    replicas = sts["spec"]["replicas"]
    assert replicas >= 3 and replicas % 2 == 1, "an odd number of peers >= 3 for the Raft quorum"
    container = the_container(sts)
    env = container_env(container, {})
    assert env["QDRANT__CLUSTER__ENABLED"] == "true"
    p2p = container_port(container, "p2p")
    assert int(env.get("QDRANT__CLUSTER__P2P__PORT", 6335)) == p2p
    assert container_port(container, "http") == 6333
    headless = find("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert p2p in [container_port(container, p["targetPort"]) for p in headless["spec"]["ports"]]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/qdrant/storage"] == claim["metadata"]["name"], "storage must be the per-peer PVC"
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert all(container_port(container, p["port"]) == 6333 for p in probes.values())


def test_qdrant_peers_bootstrap_from_peer_zero(tmp_path: Path) -> None:
    """Run the StatefulSet's start-up script as each pod would, with a stand-in for Qdrant's entrypoint."""
    if shutil.which("bash") is None:
        pytest.skip("no bash to run the script with")
    sts = find("StatefulSet", "qdrant")
    container = the_container(sts)
    assert container["command"][:2] == ["/bin/bash", "-c"]
    (script,) = container["args"]
    assert "$(" not in script, "Kubernetes would expand $(...) in args before the shell sees it"
    entrypoint = tmp_path / "entrypoint.sh"
    entrypoint.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    entrypoint.chmod(0o755)
    name, peers = sts["metadata"]["name"], sts["spec"]["serviceName"]
    p2p = container_port(container, "p2p")
    first = f"http://{name}-0.{peers}:{p2p}"
    for ordinal in range(sts["spec"]["replicas"]):
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "HOSTNAME": f"{name}-{ordinal}"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        own = f"http://{name}-{ordinal}.{peers}:{p2p}"  # the pod's DNS name under the headless Service
        expected = ["--uri", own] if ordinal == 0 else ["--bootstrap", first, "--uri", own]
        assert result.stdout.split() == expected, f"peer {ordinal}"


def test_qdrant_disruption_budget_keeps_quorum() -> None:
    sts = find("StatefulSet", "qdrant")
    pdb = find("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == sts["spec"]["replicas"] // 2 + 1
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def test_services_select_pods_and_ports_that_exist() -> None:
    workloads = [d for d in manifests() if d["kind"] in WORKLOADS]
    for svc in (d for d in manifests() if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        selected = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
        for port in svc["spec"]["ports"]:
            container_port(the_container(selected[0]), port.get("targetPort", port["port"]))


def test_visrec_reaches_qdrant_through_its_service() -> None:
    url = urlsplit(configmap()["VISREC_QDRANT__URL"])
    svc = find("Service", url.hostname)  # a short name: the same namespace, whichever it is
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
    assert container_port(the_container(find("StatefulSet", "qdrant")), port["targetPort"]) == 6333


def test_references_to_configmaps_secrets_and_claims_exist() -> None:
    secret = find("Secret", "visrec-secrets")
    keys = {**secret.get("stringData", {}), **secret.get("data", {})}
    for workload in (d for d in manifests() if d["kind"] in WORKLOADS):
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volumes.update({t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])})
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                find("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        for container in containers(workload, init=True):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    find("ConfigMap", source["configMapRef"]["name"])
                if "secretRef" in source:
                    find("Secret", source["secretRef"]["name"])
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "visrec-secrets" and ref["key"] in keys, item
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']}: no volume {mount['name']!r}"


def test_secret_holds_placeholders_only() -> None:
    secret = find("Secret", "visrec-secrets")
    assert "data" not in secret, "no encoded values: placeholders in stringData"
    for key, value in secret["stringData"].items():
        assert value.startswith("REPLACE-ME"), f"{key}: an example Secret holds placeholders, not keys"
    assert "EXAMPLE" in (DEPLOY / secret["_file"]).read_text().split("apiVersion")[0]


def test_api_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = find("Deployment", "visrec-api")
    assert deployment["spec"]["replicas"] >= 2
    container = the_container(deployment)
    assert container["image"].split(":")[0] == "visrec" and container.get("args", ["serve"]) == ["serve"]
    settings = settings_from(container_env(container, {}), monkeypatch)
    assert settings.api.host == "0.0.0.0" and settings.qdrant.url
    assert settings.api.api_key and settings.qdrant.api_key, "both keys come from the Secret"
    assert container_port(container, "http") == settings.api.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container_port(container, container[kind]["httpGet"]["port"]) == settings.api.port, kind
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(settings.artefact)].get("readOnly"), "the model is mounted read-only at VISREC_ARTEFACT"
    security = pod_spec(deployment)["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == dockerfile_uid()


def test_probe_routes_exist_and_need_no_api_key(live_api: int) -> None:
    """Every path a probe uses (Dockerfile, compose, Kubernetes) is a route of the real app, open without
    X-API-Key (probes send none), and answers on the live app, which has a key set."""
    app = create_app(Settings(_env_file=None), torch.device("cpu"))
    routes = {route.path for route in iter_route_contexts(app.routes)}  # included routers too
    paths = {"/healthz"}  # the Dockerfile's and compose's healthchecks, checked above to use it
    container = the_container(find("Deployment", "visrec-api"))
    probes = ("readinessProbe", "livenessProbe", "startupProbe")
    paths |= {container[kind]["httpGet"]["path"] for kind in probes}
    assert paths == {"/healthz", "/readyz"}
    for path in paths:
        assert path in routes and path in OPEN_PATHS, path
    assert get_status(live_api, "/healthz") == 200
    assert get_status(live_api, "/readyz") == 503  # up, but no model and no collection: not ready
    assert get_status(live_api, "/products") == 401  # the key is enforced elsewhere


def test_ingest_job_is_indexed_and_shards_match(monkeypatch: pytest.MonkeyPatch) -> None:
    job = find("Job", "visrec-sync")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    shards = spec["completions"]
    assert spec["parallelism"] == shards >= 2
    restart = pod_spec(job)["restartPolicy"]
    assert restart in ("Never", "OnFailure")
    if "backoffLimitPerIndex" in spec:
        assert restart == "Never", "backoffLimitPerIndex requires restartPolicy: Never"
    else:
        assert "backoffLimit" in spec
    container = the_container(job)
    index_env = [e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert index_env and index_env[0]["valueFrom"]["fieldRef"]["fieldPath"] == JOB_INDEX_FIELD
    command = container.get("command") or json.loads(instructions("ENTRYPOINT")[0])
    assert command == ["visrec"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    reports = set()
    for index in range(shards):
        env = container_env(container, {JOB_INDEX_FIELD: str(index)})
        args = [k8s_expand(arg, env) for arg in container["args"]]
        assert args[0] == "sync" and args[2:] == ["--shard", f"{index}/{shards}"], args
        catalogue = PurePosixPath(args[1])
        assert str(catalogue.parent) in mounts and mounts[str(catalogue.parent)].get("readOnly")
        settings = settings_from(env, monkeypatch)
        assert mounts[str(settings.artefact)].get("readOnly")
        report = PurePosixPath(settings.ingest.failure_report)
        assert str(report.parent) in mounts and not mounts[str(report.parent)].get("readOnly")
        reports.add(report)
    assert len(reports) == shards, "each worker writes its own failure report"
    assert "/dev/shm" in mounts, "the DataLoader's workers need more than the default 64 MB of /dev/shm"
    security = pod_spec(job)["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == dockerfile_uid()
    for init in pod_spec(job).get("initContainers", []):
        if init["command"][:2] == ["python", "-c"]:
            compile(init["command"][2], init["name"], "exec")


def test_ingest_job_shards_cover_the_catalogue_once() -> None:
    """The N workers' --shard arguments, as visrec parses them, split products into disjoint parts
    that together hold every product."""
    from visrec.ingest import Shard

    container = the_container(find("Job", "visrec-sync"))
    shards = find("Job", "visrec-sync")["spec"]["completions"]
    parsed = []
    for index in range(shards):
        env = container_env(container, {JOB_INDEX_FIELD: str(index)})
        args = [k8s_expand(arg, env) for arg in container["args"]]
        parsed.append(Shard.parse(args[args.index("--shard") + 1]))
    product_ids = [f"sku-{i}" for i in range(2000)]
    for product_id in product_ids:
        assert sum(product_id in shard for shard in parsed) == 1, product_id
    assert all(any(p in shard for p in product_ids) for shard in parsed), "a worker would get nothing"
