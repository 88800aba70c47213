"""Shared by the test_deploy_* modules: the deployment files read with maintained parsers, visrec's
settings checked against them, and the real app served over HTTP.

No Docker engine or cluster runs here, so those modules parse the files and check what breaks silently
when one side changes: the files against each other (names, ports, secrets, volumes, the image's user),
against visrec (its settings, CLI and routes, on the real app), and the start-up logic the files carry,
run for real (Qdrant's peer bootstrap script for every peer, the healthcheck commands against live
servers, the Job's arguments expanded as Kubernetes does for every completion index).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
import yaml
from dockerfile_parse import DockerfileParser
from pydantic import BaseModel, SecretStr

from visrec.api import create_app
from visrec.config import ApiSettings, QdrantSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
QDRANT_IMAGE = re.compile(r"^qdrant/qdrant:v(\d+\.\d+\.\d+)$")  # an exact release, never `latest`
WORKLOADS = ("Deployment", "StatefulSet", "Job")


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- Dockerfile ---------------------------------------------------------------------------------------


@cache
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined, comments dropped."""
    # dockerfile-parse silently drops an instruction left open by a final backslash
    assert not DOCKERFILE.read_text().rstrip().endswith("\\"), "the Dockerfile ends inside a continuation"
    stages: list[list[tuple[str, str]]] = []
    for item in DockerfileParser(path=str(DOCKERFILE), env_replace=False).structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages and item["instruction"] != "COMMENT":  # ARGs before the first FROM are left out
            stages[-1].append((item["instruction"], item["value"]))
    return stages


def instructions(keyword: str, stage: int = -1) -> list[str]:
    return [args for key, args in dockerfile_stages()[stage] if key == keyword]


def dockerfile_uid() -> int:
    users = instructions("USER")
    assert users, "the final stage sets no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: use a numeric uid, which Kubernetes' runAsNonRoot can check"
    return int(uid)


# --- Kubernetes manifests in deploy/ ------------------------------------------------------------------


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


# --- visrec's settings --------------------------------------------------------------------------------


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
        return Settings(_env_file=None)


def assert_known_setting(name: str) -> None:
    model: type[BaseModel] = Settings
    *groups, leaf = name.removeprefix("VISREC_").lower().split("__")
    for group in groups:
        assert group in model.model_fields, f"{name}: visrec has no settings group {group!r}"
        annotation = model.model_fields[group].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), name
        model = annotation
    assert leaf in model.model_fields, f"{name}: visrec has no setting {leaf!r} (a typo is ignored silently)"


# --- live processes -----------------------------------------------------------------------------------


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve_keyed_app(artefact_dir: Path) -> Iterator[int]:
    """The real app over HTTP, with an API key set, no model and no collection: its port."""
    settings = Settings(
        _env_file=None,
        artefact=artefact_dir / "no-model",
        qdrant=QdrantSettings(url=":memory:"),
        api=ApiSettings(api_key=SecretStr("the-key")),
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings, torch.device("cpu")), log_level="warning"))
    sock = free_socket()  # bound before the thread starts: no race for the port
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def run_python(code: str, **env: str) -> int:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, timeout=60).returncode
