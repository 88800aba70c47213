"""The owner channel under hostile conditions, with real Unix sockets and real processes: a store folder
copied with its marker, a job for another store or another protocol, junk on the socket, a peer that
never answers, a peer of another user, a command that stops reading (paused) while its job holds the
writer. The store's owner must run only its own store's jobs, the command must never hang nor talk to a
stranger, and a paused command must never stop the service's writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.helpers import run_visrec, settings_env
from tests.faults.served import serve, synced_store
from tests.helpers import draw_product, small_settings
from visrec.artefact import Manifest
from visrec.config import QdrantSettings, Settings
from visrec.errors import IndexUnavailable
from visrec.handover import HandedOverError, Owner, find_owner, hand_over
from visrec.index import open_index
from visrec.jobs import PROTOCOL, Job, JobRequest, Progress, RollbackJob, StoreId
from visrec.owner import OwnerChannel, StoreClaim, marker, store_id

NOBODY = 65534
IDLE_S = 5.0  # the shortest idle timeout the settings take


class Recorder:
    """A job handler that records what it was asked and answers at once (or as `work` says)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.lock = threading.Lock()  # stands for the writer's lock
        self.work: Any = None

    def __call__(self, job: Job, progress: Progress) -> dict[str, Any]:
        with self.lock:
            self.jobs.append(job)
            if self.work is not None:
                self.work(progress)
            return {"ran": job.command}


@contextlib.contextmanager
def channel(root: Path, collection: str = "products") -> Iterator[tuple[OwnerChannel, Recorder]]:
    recorder = Recorder()
    settings = qdrant(root, collection)
    owner = OwnerChannel(settings, StoreClaim(settings), recorder)
    owner.start()
    try:
        yield owner, recorder
    finally:
        owner.close()


def qdrant(path: Path, collection: str = "products", **timeouts: float) -> QdrantSettings:
    return QdrantSettings(path=path, collection=collection, **timeouts)


def ask(path: Path, line: bytes, timeout_s: float = 10) -> list[dict[str, Any]]:
    """Send one raw line to the socket at `path`; every answer line until the service closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        conn.connect(str(path))
        conn.sendall(line)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        return [json.loads(answer) for answer in conn.makefile("rb")]


def request(store: StoreId, protocol: int = PROTOCOL) -> bytes:
    return JobRequest(protocol=protocol, store=store, job=RollbackJob()).model_dump_json().encode() + b"\n"


# --- the marker and the request name the store ------------------------------------------------------------


def test_a_marker_copied_with_its_store_folder_names_no_owner(tmp_path: Path) -> None:
    with channel(tmp_path / "store") as (owner, _):
        assert find_owner(qdrant(tmp_path / "store")) == Owner(owner.path, owner.store)
        shutil.copytree(tmp_path / "store", tmp_path / "copy")
        assert marker(qdrant(tmp_path / "copy")).exists()  # the copy carries the marker…
        assert find_owner(qdrant(tmp_path / "copy")) is None  # …which is not the copy's
        (tmp_path / "store").rename(tmp_path / "moved")  # the folder itself, elsewhere: still its owner's
        (tmp_path / "store").symlink_to(tmp_path / "moved")
        assert find_owner(qdrant(tmp_path / "store")) is not None
        assert find_owner(qdrant(tmp_path / "store", "other")) is None  # another collection has no marker


def test_a_job_for_another_store_or_collection_is_refused(tmp_path: Path) -> None:
    (tmp_path / "copy").mkdir()
    with channel(tmp_path / "store") as (owner, recorder):
        for other in (
            store_id(qdrant(tmp_path / "copy")),
            owner.store.model_copy(update={"collection": "x"}),
        ):
            with pytest.raises(HandedOverError) as refused:
                hand_over(Owner(owner.path, other), RollbackJob(), None, qdrant(tmp_path / "store"))
            assert refused.value.exit_code == 4 and "nothing was run" in str(refused.value)
        assert recorder.jobs == []
        assert hand_over(Owner(owner.path, owner.store), RollbackJob(), None, owner_settings(owner)) == {
            "ran": "rollback"
        }


def owner_settings(owner: OwnerChannel) -> QdrantSettings:
    return qdrant(owner.store.path, owner.store.collection)


def test_a_store_folder_removed_under_its_service_takes_no_job(tmp_path: Path) -> None:
    with channel(tmp_path / "store") as (owner, recorder):
        shutil.rmtree(tmp_path / "store")
        (tmp_path / "store").mkdir()  # a restored copy at the same path: another folder
        [answer] = ask(owner.path, request(owner.store))
        assert answer["exit_code"] == 4 and "removed" in answer["error"] and recorder.jobs == []


def test_another_protocol_version_is_refused(tmp_path: Path) -> None:
    with channel(tmp_path / "store") as (owner, recorder):
        for protocol in (PROTOCOL + 1, 0):
            [answer] = ask(owner.path, request(owner.store, protocol))
            assert answer["exit_code"] == 4 and "protocol" in answer["error"], answer
        line = json.dumps({"job": {"command": "rollback"}}).encode() + b"\n"  # a command from before
        [answer] = ask(owner.path, line)
        assert answer["exit_code"] == 4 and recorder.jobs == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
JUNK = st.one_of(
    st.binary(max_size=300).map(lambda b: b + b"\n"),
    JSON.map(lambda v: json.dumps(v).encode() + b"\n"),
    st.fixed_dictionaries({"protocol": st.just(PROTOCOL), "store": JSON, "job": JSON}).map(
        lambda v: json.dumps(v).encode() + b"\n"
    ),
    st.binary(min_size=1, max_size=300).filter(lambda b: b"\n" not in b),  # no newline, then EOF
)


def test_junk_on_the_socket_gets_an_error_answer_and_the_service_goes_on(tmp_path: Path) -> None:
    with channel(tmp_path / "store") as (owner, recorder):

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(JUNK)
        def junk(line: bytes) -> None:
            [answer] = ask(owner.path, line)
            assert set(answer) == {"error", "exit_code"} and answer["exit_code"] in (2, 4), answer
            assert "\n" not in answer["error"]

        junk()
        assert recorder.jobs == []
        [answer] = ask(owner.path, b"x" * 200_000)  # longer than a request may be, without a newline
        assert answer["exit_code"] == 2
        assert ask(owner.path, request(owner.store)) == [{"result": {"ran": "rollback"}}]


# --- the command never hangs, never talks to a stranger ----------------------------------------------------


def fake_marker(store: Path, socket_path: Path) -> None:
    """The marker a service on `store` would write, naming `socket_path`."""
    claim = {"socket": str(socket_path), "pid": 1, "protocol": PROTOCOL}
    marker(qdrant(store)).write_text(json.dumps(claim | store_id(qdrant(store)).model_dump(mode="json")))


def sync_env(settings: Settings, **env: str) -> dict[str, str]:
    return settings_env(settings) | env


def test_a_peer_that_never_answers_ends_the_command_with_exit_4(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)  # no model: a command hands its job over before it needs one
    store = settings.qdrant.path
    store.mkdir()
    taken: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "sock"))
        listener.listen(8)

        def accept_and_stay_silent() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = listener.accept()
                    taken.append(conn.recv(65536))  # keeps `conn` open: accepted, never answered

        threading.Thread(target=accept_and_stay_silent, daemon=True).start()
        fake_marker(store, tmp_path / "sock")
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "visrec", "sync", str(tmp_path / "catalogue.csv")],
            env=sync_env(settings, VISREC_QDRANT__OWNER_IDLE_TIMEOUT_S=str(IDLE_S)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.monotonic() - started
    assert done.returncode == 4, done.stderr
    assert f"sent nothing for {IDLE_S:g} s" in done.stderr and "nothing done is lost" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert seconds < IDLE_S + 60  # Python's start-up on a loaded machine, then the timeout
    assert any(b'"sync"' in line for line in taken)  # it was a real hand-over that was given up


def test_a_peer_whose_queue_is_full_is_given_up_within_the_connect_timeout(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, contextlib.ExitStack() as held:
        listener.bind(str(tmp_path / "sock"))
        listener.listen(0)  # never accepts: its queue fills at once
        fake_marker(store, tmp_path / "sock")
        for _ in range(4):
            with contextlib.suppress(OSError):
                waiting = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                waiting.setblocking(False)
                waiting.connect(str(tmp_path / "sock"))
        started = time.monotonic()
        with pytest.raises(IndexUnavailable, match="accepts no connection in 0.5 s"):
            find_owner(qdrant(store, owner_connect_timeout_s=0.5))
        assert time.monotonic() - started < 5


LISTENER = """
import socket, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
server.listen(8)
print("ready", flush=True)
server.settimeout(60)  # the command's start-up
got = 0
try:
    while True:  # the probe, then the hand-over if there is one
        conn, _ = server.accept()
        server.settimeout(5)
        conn.settimeout(5)
        try:
            while piece := conn.recv(65536):
                got += len(piece)
            conn.sendall(b'{"result": {"fake": true}}\\n')
        except OSError:
            pass
except OSError:
    pass
print(got, flush=True)
"""


@pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("setpriv"), reason="runs a listener as another user: root, setpriv"
)
def test_a_peer_of_another_user_is_refused_and_told_nothing(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)
    store = settings.qdrant.path
    store.mkdir()
    folder = Path(tempfile.mkdtemp(prefix="visrec-nobody-"))  # /tmp: the other user can reach it
    try:
        os.chown(folder, NOBODY, NOBODY)
        path = folder / "sock"
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        listener = subprocess.Popen(
            [*as_nobody, sys.executable, "-I", "-c", LISTENER, str(path)],
            cwd=folder,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        fake_marker(store, path)
        done = run_visrec(settings, "rollback", "--json", timeout=120)
        got, _ = listener.communicate(timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert done.returncode == 4 and "another user" in done.stderr and "nothing was sent" in done.stderr
    assert done.stdout == "" and "fake" not in done.stderr
    assert got.strip() == "0"  # the probe connected; no byte of the job reached the stranger


# --- a paused command never holds the writer --------------------------------------------------------------


def test_a_command_that_stops_reading_never_blocks_the_job(tmp_path: Path) -> None:
    lines = 200_000  # ~6 MB of progress: far more than the socket buffers hold
    with channel(tmp_path / "store") as (owner, recorder):
        finished = threading.Event()

        def chatty(progress: Progress) -> None:
            for done in range(lines):
                progress("embed", done, lines)
            finished.set()

        recorder.work = chatty
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.connect(str(owner.path))
            conn.sendall(request(owner.store))  # …and reads nothing while the job runs
            assert finished.wait(30), "the job waited on a command that does not read"
            assert recorder.lock.acquire(timeout=5)  # the writer is free for the next write
            recorder.lock.release()
            conn.settimeout(30)
            answers = [json.loads(line) for line in conn.makefile("rb")]
    progress = [a for a in answers if "progress" in a]
    assert answers[-1] == {"result": {"ran": "rollback"}}  # the last line is never dropped
    assert 0 < len(progress) < lines  # lines the command was too slow for were dropped


def test_a_silent_job_keeps_its_command_with_heartbeats(tmp_path: Path) -> None:
    with channel(tmp_path / "store") as (owner, recorder):
        recorder.work = lambda progress: time.sleep(IDLE_S + 2)
        settings = qdrant(tmp_path / "store", owner_idle_timeout_s=IDLE_S)
        assert hand_over(find_owner(settings) or pytest.fail("no owner"), RollbackJob(), None, settings) == {
            "ran": "rollback"
        }


# --- with a real `visrec serve` ---------------------------------------------------------------------------


def count(url: str) -> int:
    with httpx.Client(base_url=url, timeout=30) as client:
        return len(client.get("/products", params={"limit": 200}).json()["products"])


def test_a_sync_on_a_copy_of_a_live_store_syncs_the_copy_and_leaves_the_original(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = synced_store(tmp_path, artefact[0], n=8)
    catalogue = tmp_path / "catalogue.csv"
    header, *rows = catalogue.read_text().splitlines()
    half = tmp_path / "half.csv"
    half.write_text("\n".join([header, *rows[:4]]) + "\n")
    copy = settings.model_copy(update={"qdrant": qdrant(tmp_path / "copy")})
    with serve(settings, tmp_path / "serve.log") as served:
        shutil.copytree(settings.qdrant.path, copy.qdrant.path)  # a backup of the live store, marker and all
        assert marker(copy.qdrant).exists()
        synced = run_visrec(copy, "sync", str(half), "--max-delete", "1", "--json")
        assert synced.returncode == 0, synced.stderr
        assert json.loads(synced.stdout)["deleted"] == 4
        assert count(served.url) == 8  # the original: untouched
    with open_index(copy.qdrant) as index:
        assert sorted(index.sync_records()) == ["p0", "p1", "p2", "p3"]
    with open_index(settings.qdrant) as index:
        assert index.count() == 8


def test_a_paused_sync_does_not_stop_the_service_writes(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = synced_store(tmp_path, artefact[0], n=6)
    catalogue = tmp_path / "catalogue.csv"
    extra = [f"q{i},images/q{i}.png,circle,red,{i}" for i in range(60)]
    for i in range(60):
        draw_product(tmp_path / "images" / f"q{i}.png", "circle", "red", variant=200 + i)
    catalogue.write_text(catalogue.read_text() + "\n".join(extra) + "\n")
    write = "write-key-2"
    with serve(settings, tmp_path / "serve.log", env={"VISREC_API__WRITE_KEY": write}) as served:
        command = subprocess.Popen(
            [sys.executable, "-m", "visrec", "sync", str(catalogue), "--json"],
            env=settings_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while count(served.url) <= 6 and time.monotonic() < deadline:  # the service is running the job
                time.sleep(0.1)
            command.send_signal(signal.SIGSTOP)  # Ctrl-Z: it reads nothing more
            with httpx.Client(base_url=served.url, timeout=120, headers={"X-API-Key": write}) as client:
                started = time.monotonic()
                patched = client.patch("/products/p0", json={"price": 1})
                seconds = time.monotonic() - started
            assert patched.status_code == 200, patched.text
            assert seconds < 10  # between two of the job's upserts, not after the whole job
            deadline = time.monotonic() + 120
            while count(served.url) < 66 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert count(served.url) == 66  # the job went on without its command
        finally:
            command.send_signal(signal.SIGCONT)
        out, err = command.communicate(timeout=120)
    assert command.returncode == 0, err
    assert json.loads(out)["added"] == 60
