"""Settings a person gets wrong: a VISREC_ variable no setting reads is said (with the nearest), a bad
value or a port in use is one line and exit 2, and `visrec serve` says where it listens and what it lets
through."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.faults.served import free_port
from visrec.cli import app
from visrec.config import Settings, setting_variables, unknown_variables

KNOWN = setting_variables()
runner = CliRunner()


def test_every_setting_has_its_variable() -> None:
    """The list the warning compares with, written from the settings' own shape (not by the code)."""
    assert "VISREC_API__API_KEY" in KNOWN and "VISREC_ARTEFACT" in KNOWN and "VISREC_QDRANT__PATH" in KNOWN
    for group in ("qdrant", "embed", "ingest", "api", "train", "duplicates", "gate"):
        fields = type(getattr(Settings(), group)).model_fields
        assert {f"VISREC_{group.upper()}__{name.upper()}" for name in fields} <= set(KNOWN)


@given(name=st.sampled_from(KNOWN), lower=st.booleans())
def test_a_setting_is_never_warned(name: str, lower: bool) -> None:
    name = name.lower() if lower else name  # the environment is read without regard to case
    assert unknown_variables({name: "1"}, {name: "1"}) == []


@given(name=st.sampled_from([n for n in KNOWN if "__" in n]), data=st.data())
def test_a_slip_of_one_character_is_warned_with_the_nearest_setting(name: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(len("VISREC_") + 1, len(name) - 1))
    slip = data.draw(
        st.sampled_from(
            [name[:at] + name[at + 1 :], name[:at] + name[at] + name[at:], name[:at] + "X" + name[at + 1 :]]
        )
    )
    if slip.upper() in KNOWN:
        return
    [problem] = unknown_variables({slip: "1"}, {})
    assert problem.startswith(f"{slip} (in the environment) is not a visrec setting and is ignored")
    assert "did you mean VISREC_" in problem


def test_the_one_underscore_key_and_compose_variables() -> None:
    """VISREC_API_KEY in the environment would leave the service open: warned; in the .env that
    docker-compose.yml reads (and visrec too, run in that folder), it is compose's own: not warned."""
    [problem] = unknown_variables({"VISREC_API_KEY": "k"}, {"VISREC_API_KEY": "k", "VISREC_COLLECTION": "p"})
    assert "VISREC_API_KEY (in the environment)" in problem and "did you mean VISREC_API__API_KEY?" in problem
    knobs = {"VISREC_FAULTS_SEED": "1", "VISREC_STRESS_STEPS": "2", "VISREC_LIVE_EXAMPLES": "3", "PATH": "/"}
    assert unknown_variables(knobs, {}) == []


def test_an_unknown_variable_reaches_the_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VISREC_QDRANT_PATH", str(tmp_path))  # one underscore: the default store is used
    monkeypatch.setenv("VISREC_QDRANT__PATH", str(tmp_path / "store"))
    said = " ".join(runner.invoke(app, ["status"]).output.split())  # rich wraps the log's lines
    assert "VISREC_QDRANT_PATH (in the environment) is not a visrec setting" in said
    assert "did you mean VISREC_QDRANT__PATH?" in said


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("VISREC_API__PORT", "99999", "VISREC_API__PORT"),
        ("VISREC_EMBED__BATCH_SIZE", "zero", "VISREC_EMBED__BATCH_SIZE"),
        ("VISREC_INGEST__IMAGE_ROOTS", "/data", "JSON"),
        ("VISREC_API__CURRENCY", "euro", "ISO 4217"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str
) -> None:
    monkeypatch.setenv(variable, value)
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2 and said in result.stderr and "Traceback" not in result.output


def test_similar_needs_one_query_and_a_readable_photo(tmp_path: Path) -> None:
    for args in ([], ["p1", "--image", str(tmp_path / "x.png")], ["--image", str(tmp_path / "none.png")]):
        result = runner.invoke(app, ["similar", *args], env={"VISREC_QDRANT__PATH": str(tmp_path / "q")})
        assert result.exit_code in (2, 4), (args, result.output)  # 4: no store here for the last one
        assert "Traceback" not in result.output


def test_serve_on_a_port_in_use_is_exit_2_before_loading(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        env = {"VISREC_QDRANT__PATH": str(tmp_path / "q"), "VISREC_ARTEFACT": str(tmp_path / "none")}
        result = runner.invoke(app, ["serve", "--port", str(port)], env=env)
        assert result.exit_code == 2, result.output
        assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    finally:
        taken.close()


def test_serve_says_where_it_listens_and_what_it_lets_through(settings: Settings, tmp_path: Path) -> None:
    """A real `visrec serve`: its first lines name the URL, that reads are open (no key set), that writes
    need the write key, and the store it owns."""
    port = free_port()
    env = {
        "VISREC_QDRANT__PATH": str(settings.qdrant.path),
        "VISREC_ARTEFACT": str(settings.artefact),
        "VISREC_API__WRITE_KEY": "w",
        "VISREC_EMBED__DEVICE": "cpu",
        "PATH": "/usr/bin:/bin",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "visrec", "serve", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        assert process.stderr is not None
        while time.monotonic() < deadline and not any("store:" in line for line in lines):
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert f"visrec serves http://127.0.0.1:{port} (the API's docs: http://127.0.0.1:{port}/docs)" in text
        assert "reads: open to anyone who can reach this address" in text
        assert "writes: need the write key in X-API-Key" in text
        assert f"store: {settings.qdrant.path}" in text
    finally:
        process.terminate()
        process.wait(30)
