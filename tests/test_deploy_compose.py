"""docker-compose.yml (read with PyYAML): its services against each other, the Kubernetes manifests and
visrec's settings, and its healthchecks run against live servers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy_helpers import (
    QDRANT_IMAGE,
    ROOT,
    find,
    run_python,
    serve_keyed_app,
    settings_from,
    the_container,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
VISREC_SERVICES = ("api", "worker", "worker-cpu")


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with serve_keyed_app(tmp_path_factory.mktemp("deploy")) as port:
        yield port


@pytest.fixture
def stub_http() -> Iterator[Callable[[int], int]]:
    """start(status) -> port of a server answering GET /readyz with `status`."""
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


def test_compose_qdrant_storage_api_key_and_healthcheck(stub_http: Callable[[int], int]) -> None:
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
    reason="needs `docker compose` (Docker's compose plugin; scripts/test.sh does not install it) to "
    "validate docker-compose.yml; its services are still checked as YAML above",
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
