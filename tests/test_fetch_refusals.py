"""visrec.fetch's refusals against real loopback servers: nothing is sent to a non-public address,
whether it is named in the URL, resolved from a name, or reached by a redirect; credentials in URLs are
refused and never echoed."""

from __future__ import annotations

from collections.abc import Callable

import httpcore
import httpx
import pytest

from tests.fetch_servers import LOOPBACK, fails, ok, serve
from tests.helpers import closed_port
from visrec import connect
from visrec.fetch import Fetcher
from visrec.urls import FetchPolicy, check_url


def test_loopback_ip_is_refused_and_never_contacted(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher()
    with serve(ok()) as server:
        live = fails(f, server.url())
        dead_port = closed_port()
        dead = fails(f, f"http://127.0.0.1:{dead_port}/x.jpg")
        assert server.hits == []
    assert live == (
        f"{server.url()}: refused: 127.0.0.1 resolves to a non-public address "
        "(allow it with VISREC_INGEST__ALLOWED_HOSTS)"
    )
    # Nothing tells a listening port from a closed one.
    assert live.replace(str(server.port), "PORT") == dead.replace(str(dead_port), "PORT")


def test_a_name_resolving_to_loopback_is_refused_at_connect_time(fetcher: Callable[..., Fetcher]) -> None:
    with serve(ok()) as server:
        dead_port = closed_port()
        f = fetcher(allowed_ports=(server.port, dead_port))  # so that only the address is in question
        url = f"http://localhost:{server.port}/x.jpg"
        assert check_url(url, f.policy) is None  # a name: only the connection check can refuse it
        live = fails(f, url)
        dead = fails(f, f"http://localhost:{dead_port}/x.jpg")
        assert server.hits == []
    assert "refused: localhost resolves to a non-public address" in live
    assert live.replace(str(server.port), "PORT") == dead.replace(str(dead_port), "PORT")


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"])
def test_a_redirect_from_an_allowed_host_to_an_internal_one_is_refused(
    fetcher: Callable[..., Fetcher], target: str
) -> None:
    with serve(ok()) as internal:
        f = fetcher(allowed_hosts=("127.0.0.2",), allowed_ports=(internal.port,))
        location = f"http://{target}:{internal.port}/secret"
        with serve(lambda h: h.reply(302, headers={"Location": location}), host="127.0.0.2") as allowed:
            message = fails(f, allowed.url())
            assert len(allowed.hits) == 1
        assert internal.hits == []
    assert f"redirected to {location}): refused: {target} resolves to a non-public address" in message


def test_the_connection_guard_is_installed() -> None:
    """Fails loudly if httpx stops keeping its pool where `_GuardedTransport` replaces it."""
    assert type(httpx.HTTPTransport()._pool) is httpcore.ConnectionPool
    backend = connect.GuardedBackend(FetchPolicy())
    transport = connect.GuardedTransport(backend)
    assert transport._pool._network_backend is backend
    with pytest.raises(connect.Refused):
        backend.connect_tcp("127.0.0.1", closed_port())


def test_credentials_in_urls_are_refused_and_not_echoed(fetcher: Callable[..., Fetcher]) -> None:
    message = fails(fetcher(allowed_hosts=LOOPBACK), "http://shop:hunter2@127.0.0.1/x.jpg")
    assert "user:password@" in message and "hunter2" not in message and "***@127.0.0.1" in message


@pytest.mark.parametrize("status", [204, 299, 300, 304, 399])
def test_only_a_2xx_is_a_body(fetcher: Callable[..., Fetcher], status: int) -> None:
    """A 3xx without a Location is no redirect and no photo: refused with its status, body unread."""
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(lambda h: h.reply(status, b"" if status in (204, 304) else b"not a photo")) as server:
        if status < 300:
            assert f.fetch(server.url(), 100) == (b"" if status == 204 else b"not a photo")
        else:
            assert fails(f, server.url()) == f"{server.url()}: HTTP {status}"


def test_a_url_that_is_no_text_is_refused_by_its_repr(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher()
    assert fails(f, 1234) == "1234: refused: not a text URL"  # type: ignore[arg-type]


def test_an_unexpected_failure_is_an_image_error_naming_it(
    fetcher: Callable[..., Fetcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong inside a fetch reaches the caller as an ImageError naming the URL (its
    credentials hidden) and the failure, never as another exception."""
    f = fetcher()

    def broken(*args: object) -> bytes:
        raise RuntimeError("a bug\nwith a line feed")

    monkeypatch.setattr(Fetcher, "_follow", broken)
    assert fails(f, "https://example.com/x.jpg") == (
        "https://example.com/x.jpg: unexpected error: RuntimeError: a bug\\nwith a line feed"
    )
