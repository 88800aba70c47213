"""Qdrant unreachable or failing: bounded retries, then one clear line and exit code 4; a rerun after
recovery finishes the job.

No Qdrant server can run on this machine, so the broken servers are loopback stand-ins: an HTTP
endpoint answering 503, a TCP proxy that accepts and drops or stalls connections, a closed port. The
recovery case needs a real server behind the proxy and runs only when VISREC_QDRANT__URL is set; the
embedded store's own unavailability (held by another process) runs everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.faults.helpers import SERVER_URL, CountingServer, TcpProxy, settings_env
from tests.helpers import MakeCatalogue, closed_port, run_sync
from visrec.cli import app
from visrec.config import QdrantSettings, Settings
from visrec.errors import IndexUnavailable
from visrec.index import open_index

RETRIES = 3  # attempts per call; backoff 0.2 s, 0.4 s between them
COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "sync": lambda catalogue: ["sync", str(catalogue), "--json"],
    "similar": lambda catalogue: ["similar", "p1", "--json"],
    "status": lambda catalogue: ["status", "--json"],
}


def run_cli(
    args: list[str], settings: Settings, monkeypatch: pytest.MonkeyPatch, url: str | None
) -> tuple[int, str, float]:
    """`visrec ARGS` in this process with the settings' environment (and `url` as the server);
    returns the exit code, stderr and the seconds it took."""
    env = settings_env(settings) | {"VISREC_QDRANT__RETRIES": str(RETRIES), "VISREC_QDRANT__TIMEOUT_S": "1"}
    for key, value in env.items():
        if key.startswith("VISREC_"):
            monkeypatch.setenv(key, value)
    if url is None:
        monkeypatch.delenv("VISREC_QDRANT__URL", raising=False)
    else:
        monkeypatch.setenv("VISREC_QDRANT__URL", url)
    started = time.monotonic()
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stderr, time.monotonic() - started


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("fault", ["http-503", "drop", "refused"])
def test_a_failing_server_ends_the_command_with_exit_4(
    fault: str,
    command: str,
    store: Settings,
    make_catalogue: MakeCatalogue,
    answers_503: CountingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault: the Qdrant server answers 503 to everything (a loopback stand-in), or accepts connections
    and drops them, or nothing listens on its port. visrec: each call is retried with exponential
    backoff, VISREC_QDRANT__RETRIES attempts in all (logged before each sleep), then the command prints
    one `error:` line naming the server and the cause and exits with IndexUnavailable's code, 4.
    Checked: exit code 4, no traceback, the message, exactly RETRIES attempts, bounded time."""
    dropper = TcpProxy(None, "drop")
    url = {
        "http-503": f"http://127.0.0.1:{answers_503.server_address[1]}",
        "drop": dropper.url,
        "refused": f"http://127.0.0.1:{closed_port()}",
    }[fault]
    try:
        code, stderr, seconds = run_cli(COMMANDS[command](make_catalogue(3)), store, monkeypatch, url)
    finally:
        dropper.close()
    assert code == IndexUnavailable.exit_code, stderr
    assert "Traceback" not in stderr
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and url in error[0], stderr
    cause = {"http-503": "keeps failing: HTTP 503", "drop": "unreachable", "refused": "unreachable"}[fault]
    assert cause in error[0]
    assert stderr.count("Retrying") == RETRIES - 1  # tenacity logs before each sleep
    if fault == "http-503":
        assert answers_503.hits == RETRIES
    elif fault == "drop":
        assert dropper.accepted >= RETRIES
    assert seconds < 10


def test_a_stalled_server_times_out_then_exit_4(
    store: Settings, make_catalogue: MakeCatalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: the server accepts connections and never answers. visrec: each attempt times out after
    VISREC_QDRANT__TIMEOUT_S (1 s here), is retried with backoff, and `visrec sync` exits 4 with one
    line. Checked: exit code 4, the message, and a run time bounded by attempts x (timeout + backoff)."""
    staller = TcpProxy(None, "stall")
    try:
        code, stderr, seconds = run_cli(["sync", str(make_catalogue(3))], store, monkeypatch, staller.url)
    finally:
        staller.close()
    assert code == IndexUnavailable.exit_code, stderr
    assert "unreachable" in stderr and "timed out" in stderr.lower()
    assert RETRIES * 1 <= seconds < RETRIES * (1 + 0.5) + 5


def test_an_embedded_store_in_use_then_released_finishes_on_rerun(
    store: Settings, make_catalogue: MakeCatalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: the embedded store is held by another process (its WAL is locked). visrec: `visrec sync`
    and `visrec similar` wait lock_wait_s for it, then stop with one line, "in use", exit 4, having
    written nothing. When the
    holder lets go, a rerun indexes everything. Checked: exit code 4 and message while held; after
    release, the rerun's summary and the index hold all products."""
    if SERVER_URL:
        pytest.skip("the embedded store only: a server is not locked by a client")
    catalogue = make_catalogue(8)
    store = store.model_copy(update={"qdrant": store.qdrant.model_copy(update={"lock_wait_s": 0.5})})
    run_sync(make_catalogue(2, name="seed.csv"), store)  # the collection exists
    with open_index(store.qdrant):  # the holder
        for args in (["sync", str(catalogue), "--json"], ["similar", "p0"]):
            code, stderr, _ = run_cli(args, store, monkeypatch, None)
            assert code == IndexUnavailable.exit_code and "in use" in stderr, stderr
    code, _, _ = run_cli(["sync", str(catalogue), "--json"], store, monkeypatch, None)
    assert code == 0
    with open_index(store.qdrant) as index:
        assert sorted(index.sync_records()) == sorted(f"p{i}" for i in range(8))


def test_the_proxy_forwards_drops_and_stalls(answers_503: CountingServer) -> None:
    """The test tool itself, so that the server-only case below can be trusted: in `pass` mode a
    request goes through to the loopback server; `drop` closes connections; `stall` never answers."""
    tcp = TcpProxy(("127.0.0.1", int(answers_503.server_address[1])))
    try:
        with httpx.Client(timeout=0.5) as client:
            assert client.get(tcp.url + "/x").status_code == 503
            tcp.switch("drop")
            with pytest.raises(httpx.RemoteProtocolError):
                client.get(tcp.url + "/x")
            tcp.switch("stall")
            with pytest.raises(httpx.ReadTimeout):
                client.get(tcp.url + "/x")
            tcp.switch("pass")
            assert client.get(tcp.url + "/x").status_code == 503
    finally:
        tcp.close()


@pytest.mark.integration
@pytest.mark.skipif(not SERVER_URL, reason="needs a Qdrant server: set VISREC_QDRANT__URL=http://host:6333")
def test_a_server_lost_mid_sync_then_recovered_loses_nothing(
    store: Settings, make_catalogue: MakeCatalogue, proxy: TcpProxy
) -> None:
    """Fault: the connection to a real Qdrant server drops in the middle of a sync (a TCP proxy in
    front of it is switched to drop). visrec: the upsert is retried with backoff, then the sync stops
    with IndexUnavailable; what was written stays. After recovery (proxy back to pass) a rerun embeds
    only what is missing. Checked: the error, the partial count, and after the rerun every product
    exactly once with its payload."""
    catalogue = make_catalogue(40)
    via_proxy = store.model_copy(
        update={"qdrant": QdrantSettings(**{**store.qdrant.model_dump(), "url": proxy.url, "retries": 2})}
    )

    def cut_after_two_batches(done: int, total: int) -> None:
        if done >= 8:
            proxy.switch("drop")

    with pytest.raises(IndexUnavailable, match="unreachable"), open_index(via_proxy.qdrant) as index:
        run_sync(
            catalogue,
            via_proxy,
            index=index,
            batch_size=4,
            workers=0,
            max_delete=1.0,
            progress=cut_after_two_batches,
        )
    proxy.switch("pass")
    with open_index(via_proxy.qdrant) as index:
        partial = index.count()
    assert 0 < partial < 40
    summary = run_sync(catalogue, via_proxy)
    assert (summary.unchanged, summary.added, summary.failed) == (partial, 40 - partial, 0)
    with open_index(store.qdrant) as index:
        records = index.sync_records()
        assert index.count() == len(records) == 40
        assert sorted(records) == sorted(f"p{i}" for i in range(40))
