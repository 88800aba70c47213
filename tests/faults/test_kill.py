"""The sync process killed (SIGKILL) at random points, many times in a row, then rerun."""

from __future__ import annotations

import csv
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.helpers import SEED, ForkServer, check_index_matches_catalogue, figure, settings_env
from tests.helpers import MakeCatalogue, write_csv
from visrec.config import Settings
from visrec.errors import IndexUnavailable
from visrec.index import open_index

CYCLES = int(os.environ.get("VISREC_FAULTS_KILL_CYCLES", "5"))
BATCH = 2  # images per upsert: many small durable steps to kill between


@pytest.fixture
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def kill_plan(rng: random.Random) -> dict[str, float]:
    """Where to kill: after the n-th durable batch plus a random delay (mid-embedding, mid-upsert), or
    at a random time from the start (start-up, planning, collection creation, deletes)."""
    if rng.random() < 0.7:
        return {"after_upserts": rng.randint(1, 3), "delay_s": round(rng.uniform(0, 0.1), 3)}
    return {"after_s": round(rng.uniform(0.05, 1.5), 3)}


def test_repeated_kills_then_a_rerun_lose_and_duplicate_nothing(
    store: Settings, make_catalogue: MakeCatalogue, fork_server: ForkServer, tmp_path: Path
) -> None:
    """Fault: `visrec sync` is SIGKILLed at seeded random points (after its n-th durable batch plus a
    random delay, or at a random time from the start), VISREC_FAULTS_KILL_CYCLES times in a row, with
    some prices changed between cycles; then it runs to the end. visrec: point ids derive from product
    ids and every point carries its content hash, so each run upserts what is missing or stale and a
    kill can only leave work undone. Checked: every batch logged as upserted before a kill is in the
    index afterwards; after the rerun the count equals the catalogue's valid products, no id twice,
    every payload matches its row, and every vector equals a clean sync's."""
    rng = random.Random(SEED)
    n = max(240, 16 * CYCLES)  # enough work that a fast machine cannot finish before the kill lands
    catalogue = make_catalogue(n)
    env = settings_env(store) | {"VISREC_EMBED__BATCH_SIZE": str(BATCH)}
    argv = ["-v", "sync", str(catalogue), "--json"]
    endings: list[dict[str, Any]] = []
    points = 0
    for cycle in range(CYCLES):
        if rng.random() < 0.5:  # a changed product must be re-embedded even across kills
            reprice(catalogue, rng.sample(range(n), 3), rng)
        plan = kill_plan(rng)
        logs = tmp_path / f"cycle{cycle}"
        ended = fork_server.run(argv, env, logs, plan)
        assert ended["killed"] or ended["status"] == 0, Path(f"{logs}.err").read_text()
        durable = sum(map(int, re.findall(r"upserted (\d+) points", Path(f"{logs}.err").read_text())))
        with open_index(store.qdrant) as index:
            before, points = points, index.count() if index.exists() else 0
        # Acknowledged writes survive the kill: every point logged as upserted is there (less the
        # re-embedded changed products, which add no point).
        assert points >= min(n, before + durable - count_updates(logs)), (cycle, plan, before, points)
        endings.append({**ended, "plan": plan, "points_after": points, "batches_logged": durable // BATCH})

    final = fork_server.run(argv, env, tmp_path / "final", None)
    assert final["status"] == 0, Path(f"{tmp_path / 'final'}.err").read_text()
    lost, duplicated = check_index_matches_catalogue(store, catalogue, tmp_path)
    figure(
        "kill/rerun",
        {
            "cycles": CYCLES,
            "killed": sum(e["killed"] for e in endings),
            "finished_before_the_kill": sum(not e["killed"] for e in endings),
            "products": n,
            "points_after_each_cycle": [e["points_after"] for e in endings],
            "points_lost": lost,
            "points_duplicated": duplicated,
            "seed": SEED,
        },
    )
    assert (lost, duplicated) == (0, 0)
    assert sum(e["killed"] for e in endings) >= CYCLES // 2  # most cycles were really cut short


LOCK_WAIT_S = 0.5  # what the rerun waits for the store: less than forked loader workers held it (~5 s)


def test_a_sync_killed_with_loader_workers_leaves_the_store_free(
    store: Settings, make_catalogue: MakeCatalogue, fork_server: ForkServer, tmp_path: Path
) -> None:
    """Fault: `visrec sync` with DataLoader worker processes is SIGKILLed after its first upsert and rerun
    at once. visrec: each forked loader worker first closes the descriptors it inherited that carry a
    file lock, so none of them holds the embedded store's WAL lock; before, they held it until they
    noticed their parent was gone (seconds), and the rerun said "in use". Checked: the store opens within
    LOCK_WAIT_S of the kill, the rerun (waiting no longer than that) finishes, every product is indexed
    exactly once, and the orphaned workers end by themselves (torch's watchdog, every 5 s)."""
    if store.qdrant.url:
        pytest.skip("the lock belongs to the embedded store; a server holds no file lock for its clients")
    catalogue = make_catalogue(40)
    env = settings_env(store) | {
        "VISREC_EMBED__BATCH_SIZE": str(BATCH),
        "VISREC_EMBED__WORKERS": "2",
        "VISREC_QDRANT__LOCK_WAIT_S": str(LOCK_WAIT_S),
    }
    argv = ["-v", "sync", str(catalogue), "--json"]
    killed = fork_server.run(argv, env, tmp_path / "killed", {"after_upserts": 1, "delay_s": 0})
    reaped = time.monotonic()  # the killed sync is gone, its loader workers perhaps not yet
    assert killed["killed"], Path(f"{tmp_path / 'killed'}.err").read_text()
    probe = store.qdrant.model_copy(update={"lock_wait_s": 0.0})  # one attempt each: measures the hold
    while True:
        attempt = time.monotonic()  # the hold ends when the attempt that opens starts (opening takes time)
        try:
            open_index(probe).close()
            break
        except IndexUnavailable:
            assert time.monotonic() - reaped < 10, "the store stayed locked for 10 s after the kill"
            time.sleep(0.01)
    reopen_s = round(attempt - reaped, 3)
    # Nor do the killed sync's loader workers live on for long (they write to its log).
    while holders := processes_writing(Path(f"{tmp_path / 'killed'}.err")):
        assert time.monotonic() - reaped < 15, f"the killed sync's processes {holders} live on"
        time.sleep(0.05)
    gone_s = round(time.monotonic() - reaped, 3)
    rerun = fork_server.run(argv, env, tmp_path / "rerun", None)
    rerun_log = Path(f"{tmp_path / 'rerun'}.err").read_text()
    lost, duplicated = check_index_matches_catalogue(store, catalogue, tmp_path)
    figure(
        "kill with loader workers/reopen",
        {
            "seconds_from_kill_to_reopen": reopen_s,
            "seconds_from_kill_to_its_last_process_gone": gone_s,
            "killed_after_s": killed["seconds"],
            "rerun": rerun,
        },
    )
    assert reopen_s < LOCK_WAIT_S, f"the store stayed locked {reopen_s} s after the kill"
    assert rerun["status"] == 0 and "in use" not in rerun_log, rerun_log
    assert (lost, duplicated) == (0, 0)


def processes_writing(log: Path) -> list[int]:
    """The pids of the processes holding `log` open (Linux /proc)."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(log):
                found.append(int(fd.parts[2]))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(set(found))


def reprice(catalogue: Path, rows: list[int], rng: random.Random) -> None:
    """Change the price of some products (by row number) in the CSV."""
    table = list(read_rows(catalogue))
    for i in rows:
        table[i]["price"] = f"{rng.uniform(1, 500):.2f}"
    write_csv(catalogue, table)


def read_rows(catalogue: Path) -> Iterator[dict[str, Any]]:
    with catalogue.open(newline="") as f:
        yield from csv.DictReader(f)


def count_updates(logs: Path) -> int:
    """Products the cycle planned to re-embed (changed rows): their upserts add no points."""
    match = re.search(r"plan: \d+ new, (\d+) changed", Path(f"{logs}.err").read_text())
    return int(match.group(1)) if match else 0
