"""A handed-over job whose service ends (kill -9) or stops (SIGSTOP) midway: the command ends with exit 4
and says which, and what the job left in the store, as it is. Real `visrec serve` and `visrec`
processes on a real embedded store big enough for the job to take a moment."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faults.helpers import settings_env, spawn_visrec
from tests.faults.served import serve
from tests.test_snapshot import partial_written, random_store, store_state, visrec, wait_for
from visrec.artefact import Manifest
from visrec.config import Settings


@pytest.fixture
def big(tmp_path: Path, artefact: tuple[Path, Manifest]) -> Settings:
    return random_store(tmp_path, artefact[0], 2500)


def one_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in log.read_text(), log.read_text()
    return lines[0]


def test_a_service_killed_during_a_snapshot_is_told_from_a_silent_one(big: Settings, tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    with serve(big, tmp_path / "serve.log") as served:
        command = spawn_visrec(settings_env(big), tmp_path / "handed.log", tmp_path, "snapshot", str(snaps))
        wait_for(lambda: partial_written(snaps))
        served.process.send_signal(signal.SIGKILL)
        assert command.wait(60) == 4
        pid = served.process.pid
    line = one_line(tmp_path / "handed.log")
    assert f"(pid {pid}) ended during the snapshot: no snapshot was written" in line, line
    assert "paused" not in line and "goes on in the service" not in line
    assert not list(snaps.glob("*.visrec.tar"))


def test_a_service_killed_during_a_restore_says_which_version_is_live(big: Settings, tmp_path: Path) -> None:
    taken = visrec(big, "snapshot", str(tmp_path / "snaps"))
    with serve(big, tmp_path / "serve.log") as served:
        command = spawn_visrec(
            settings_env(big), tmp_path / "handed.log", tmp_path, "restore", taken["snapshot"]
        )
        wait_for(lambda: (big.qdrant.path / "products__v2").is_dir())
        served.process.send_signal(signal.SIGKILL)
        assert command.wait(60) == 4
    line = one_line(tmp_path / "handed.log")
    assert "ended during the restore: the live version is still products__v1, as before" in line, line
    assert "`visrec status`" in line and "paused" not in line
    assert store_state(big)[0] == "products__v1"


def test_a_stopped_service_is_said_to_be_stopped_and_goes_on_once_continued(
    big: Settings, tmp_path: Path
) -> None:
    snaps = tmp_path / "snaps"
    env = settings_env(big) | {"VISREC_QDRANT__OWNER_IDLE_TIMEOUT_S": "5"}
    with serve(big, tmp_path / "serve.log") as served:
        command = spawn_visrec(env, tmp_path / "handed.log", tmp_path, "snapshot", str(snaps))
        wait_for(lambda: partial_written(snaps))
        served.process.send_signal(signal.SIGSTOP)
        try:
            assert command.wait(60) == 4
        finally:
            served.process.send_signal(signal.SIGCONT)
        line = one_line(tmp_path / "handed.log")
        assert f"(pid {served.process.pid}) is stopped" in line and "sent nothing for 5 s" in line, line
        wait_for(lambda: bool(list(snaps.glob("*.visrec.tar"))))  # the job went on
        assert visrec(big, "status")["live_version"] == "products__v1"
