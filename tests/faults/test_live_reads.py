"""Reading commands beside a live `visrec serve` (issue #29): `status`, `similar` (by id and by a photo),
`report` and `duplicates` run in the service that owns the embedded store, beside its writer, and answer
as they do with no service: the same JSON, the same messages and exit codes for mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tests.faults.helpers import run_visrec, settings_env
from tests.faults.served import free_port, serve, synced_store
from visrec.artefact import Manifest
from visrec.config import Settings

COMMANDS: list[list[str]] = [
    ["status", "--json"],
    ["similar", "p1", "-k", "4", "--json"],
    ["similar", "p1", "-k", "4", "--colour", "red", "--diversity", "0.5", "--json"],
    ["similar", "--image", "{photo}", "-k", "3", "--where", "price=10..14", "--json"],
    ["report", "--out", "{out}/report.html", "--queries", "3", "-k", "3", "--json"],
    ["duplicates", "--json"],
    ["duplicates", "--max-distance", "1000", "--out", "{out}/dups.html", "--json"],
    ["neighbours", "--out", "{out}/feed.jsonl", "-k", "3", "--same", "category", "--json"],
    [
        "neighbours",
        "--since",
        "{out}/feed.jsonl",
        "--out",
        "{out}/delta.csv",
        "-k",
        "3",
        "--same",
        "category",
        "--json",
    ],
]
MISTAKES: list[list[str]] = [
    ["similar", "nope"],  # not indexed: 2
    ["similar", "p1", "--category", "hexagon"],  # no product has it: 2, naming those there are
    ["similar", "p1", "--where", "price=1..2", "--category", "circle"],  # each matches, not together: a note
    ["similar", "--image", "{out}/not-a-photo.png"],  # not an image: 2
    ["similar", "--image", "{out}/huge.png"],  # over the photo limit (50 MB): 2, said before handing over
    ["duplicates", "--neighbours", "0"],  # refused before the store is asked: 2
    [
        "neighbours",
        "--out",
        "{out}/other.jsonl",
        "--since",
        "{out}/feed.jsonl",
        "-k",
        "5",
    ],  # other options: 2
]


def _run(settings: Settings, args: list[str], out: Path, photo: Path) -> tuple[int, str, str]:
    filled = [a.format(out=out, photo=photo) for a in args]
    done = run_visrec(settings, *filled)
    return done.returncode, done.stdout, done.stderr


def _comparable(args: list[str], stdout: str) -> object:
    """The answer without what differs by design between two runs (the report's own path)."""
    data = json.loads(stdout)
    if args[0] in ("report", "duplicates") and isinstance(data, dict):
        data.pop("report", None)
    if args[0] == "neighbours" and isinstance(data, dict):  # its files' paths, its time
        for key in ("feed", "state", "since", "seconds"):
            data.pop(key, None)
    return data


@pytest.mark.parametrize("case", range(len(COMMANDS) + len(MISTAKES)))
def test_a_read_beside_the_service_answers_as_alone(
    case: int, tmp_path: Path, artefact: tuple[Path, Manifest], live_reads: dict[str, object]
) -> None:
    args = (COMMANDS + MISTAKES)[case]
    alone, beside = live_reads["alone"], live_reads["beside"]
    assert isinstance(alone, list) and isinstance(beside, list)
    code, stdout, stderr = alone[case]
    code_beside, stdout_beside, stderr_beside = beside[case]
    assert code_beside == code, (args, stderr, stderr_beside)
    if case < len(COMMANDS):
        assert code == 0, (args, stderr)
        assert _comparable(args, stdout_beside) == _comparable(args, stdout), args
    else:
        assert code in (0, 2), (args, stderr)
        # (a file named in the message lies in each run's own folder)
        assert stderr_beside.strip() == stderr.strip().replace("out-alone", "out-beside"), args
        assert "Traceback" not in stderr_beside


@pytest.fixture(scope="module")
def live_reads(
    tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]
) -> dict[str, object]:
    """Every command run with no service, then beside a running `visrec serve` on the same store."""
    root = tmp_path_factory.mktemp("live-reads")
    settings = synced_store(root, artefact[0], n=9)
    photo = root / "images" / "p4.png"
    (root / "out-alone").mkdir()
    (root / "out-beside").mkdir()
    for out in ("out-alone", "out-beside"):
        (root / out / "not-a-photo.png").write_bytes(b"plain text, not a photo")
        with (root / out / "huge.png").open("wb") as huge:
            huge.truncate(Settings().ingest.max_image_bytes + 1)  # sparse: nothing written, nothing read
    alone = [_run(settings, args, root / "out-alone", photo) for args in COMMANDS + MISTAKES]
    with serve(settings, root / "serve.log") as served:
        beside = [_run(settings, args, root / "out-beside", photo) for args in COMMANDS + MISTAKES]
        assert "handing the" not in "".join(e for _, _, e in beside)  # (logged at -v only)
        marker = (settings.qdrant.path / f"{settings.qdrant.collection}.owner.json").read_text()
        second = subprocess.run(
            [sys.executable, "-m", "visrec", "serve", "--port", str(free_port())],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=120,
        )
        after = {
            "marker": (settings.qdrant.path / f"{settings.qdrant.collection}.owner.json").read_text(),
            "status": run_visrec(settings, "status", "--json").returncode,
            "ready": httpx.get(f"{served.url}/readyz").status_code,
        }
    reports = sorted(p.name for p in (root / "out-beside").glob("*.html"))
    assert reports == ["dups.html", "report.html"]  # written by the service, where the command said
    for feed in ("feed.jsonl", "delta.csv"):  # the same lists, whoever made them
        assert (root / "out-beside" / feed).read_text() == (root / "out-alone" / feed).read_text()
    return {"alone": alone, "beside": beside, "second": second, "marker": marker, "after": after}


def test_a_second_service_on_an_owned_store_stops_at_once(live_reads: dict[str, object]) -> None:
    """A second `visrec serve` on a store a running one owns: exit 4 at start, saying which owns it; the
    first one's marker untouched, its commands and readiness as before."""
    second = live_reads["second"]
    assert isinstance(second, subprocess.CompletedProcess)
    assert second.returncode == 4, second.stderr
    assert "is owned by another running `visrec serve` (pid " in second.stderr
    assert "Traceback" not in second.stderr and "listening" not in second.stderr
    assert live_reads["after"] == {"marker": live_reads["marker"], "status": 0, "ready": 200}


def test_a_request_the_service_refuses_says_so(tmp_path: Path, artefact: tuple[Path, Manifest]) -> None:
    """A query photo over the service's own limit (its settings may be smaller than the command's): the
    service reads the whole request and answers why, exit 2; the command is not told the service hung."""
    from visrec.api import create_app
    from visrec.handover import HandedOverError, find_owner, hand_over
    from visrec.jobs import SimilarJob

    settings = synced_store(tmp_path, artefact[0], n=3)
    ingest = settings.ingest.model_copy(update={"max_image_bytes": 1000})
    small = settings.model_copy(update={"ingest": ingest})
    with TestClient(create_app(small, torch.device("cpu"))):
        owner = find_owner(settings.qdrant)
        assert owner is not None
        for size in (10**5, 4 * 10**6):  # within and far beyond the socket's buffers
            with pytest.raises(HandedOverError) as refused:
                hand_over(owner, SimilarJob(image=b"x" * size, k=3), None, settings.qdrant)
            assert refused.value.exit_code == 2
            assert "refused by the service: the request is over" in str(refused.value)
            assert "VISREC_INGEST__MAX_IMAGE_BYTES" in str(refused.value)
        assert hand_over(owner, SimilarJob(product_id="p1", k=2), None, settings.qdrant)["hits"]


def test_reads_do_not_wait_for_the_writer(tmp_path: Path, artefact: tuple[Path, Manifest]) -> None:
    """A reading command handed over while the writer is held (a job, a write) is answered at once."""
    from visrec.api import create_app
    from visrec.handover import find_owner, hand_over
    from visrec.jobs import SimilarJob, StatusJob

    settings = synced_store(tmp_path, artefact[0], n=6)
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        writer = client.app.state.writes.writer  # type: ignore[attr-defined]
        owner = find_owner(settings.qdrant)
        assert owner is not None
        answers: list[dict[str, object]] = []
        with writer.jobs, writer.lock:  # a job, and a write, under way
            started = time.monotonic()
            reading = threading.Thread(
                target=lambda: answers.extend(
                    hand_over(owner, job, None, settings.qdrant)
                    for job in (StatusJob(), SimilarJob(product_id="p1", k=3))
                )
            )
            reading.start()
            reading.join(30)
            took = time.monotonic() - started
        assert len(answers) == 2 and took < 10, took
        assert answers[0]["points"] == 6 and len(answers[1]["hits"]) == 3  # type: ignore[arg-type]
