"""Connections an image fetch may make: the host is resolved once, every address must be public (or
allowed), and the socket connects to that checked address, so no second lookup can answer differently
(DNS rebinding); every read, write and TLS handshake waits no longer than the fetch's deadline.

Hooked into httpx through its connection pool's network backend (`GuardedTransport`).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from visrec.urls import FetchPolicy, allowlist, in_networks, is_public


class Refused(Exception):
    """Raised from inside httpcore when a connection would reach a non-public address; not an httpx
    error, so httpx lets it through unmapped and nothing retries it."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.host = host


class GuardedBackend(httpcore.SyncBackend):
    """Resolves once, checks every address, connects to a checked one (TLS still verifies the name: httpcore
    passes the origin's host name as SNI), and holds every socket operation to the calling thread's fetch
    deadline."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._names, self._networks = allowlist(policy.allowed_hosts)
        self._local = threading.local()  # the deadline of the fetch running in this thread

    def set_deadline(self, deadline: float | None) -> None:
        self._local.deadline = deadline

    def remaining(self, timeout: float | None) -> float | None:
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return timeout
        left = deadline - time.monotonic()
        return left if timeout is None else min(timeout, left)

    def bounded(self, timeout: float | None, error: type[Exception]) -> float | None:
        left = self.remaining(timeout)
        if left is not None and left <= 0:
            raise error("the fetch deadline has passed")
        return left

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        name = host.lower().rstrip(".")
        targets = resolve(host, port, self.bounded(timeout, httpcore.ConnectTimeout))
        if name not in self._names:
            for target in targets:
                address = ipaddress.ip_address(target.split("%")[0])
                if not is_public(address) and not in_networks(address, self._networks):
                    raise Refused(host)  # before any packet goes to any of the addresses
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for target in targets:
            try:
                # The checked IP literal, not the name: a second lookup could answer differently.
                stream = super().connect_tcp(
                    target,
                    port,
                    self.bounded(timeout, httpcore.ConnectTimeout),
                    local_address,
                    socket_options,
                )
            except httpcore.ConnectError as exc:
                error = exc
                continue
            return DeadlineStream(stream, self)
        raise error


def resolve(host: str, port: int, timeout: float | None) -> list[str]:
    """The addresses of `host`, in the resolver's order, within `timeout` (getaddrinfo itself has none)."""
    try:
        ipaddress.ip_address(host.split("%")[0])
        return [host]
    except ValueError:
        pass
    answer: list[list[str] | OSError] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answer.append(list(dict.fromkeys(str(info[4][0]) for info in infos)))
        except OSError as exc:
            answer.append(exc)

    # A daemon thread: a hung lookup is abandoned at the deadline and cannot hold up interpreter exit.
    thread = threading.Thread(target=lookup, name="visrec-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answer:
        raise httpcore.ConnectTimeout(f"looking up {host} took too long")
    result = answer[0]
    if isinstance(result, OSError):
        raise httpcore.ConnectError(f"cannot resolve {host} ({result.strerror or result})")
    return result


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose reads and writes wait no longer than the fetch deadline: a server that stalls
    after a trickle of bytes is cut off at the deadline, not a whole timeout later."""

    def __init__(self, inner: httpcore.NetworkStream, backend: GuardedBackend) -> None:
        self._inner, self._backend = inner, backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._backend.bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._backend.bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        bounded = self._backend.bounded(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, bounded), self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One verifying TLS context per process: making one loads the CA bundle (25-50 ms), which every
    photo fetch's new client paid twice; a context is safe to share between threads and connections."""
    return httpx.create_ssl_context(trust_env=False)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with its connection pool rebuilt on the guarded network backend."""

    def __init__(self, backend: GuardedBackend, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits()
        super().__init__(verify=shared_ssl_context(), trust_env=False, limits=limits)
        # httpx has no public hook for the network backend; it keeps the pool in `_pool` (0.28). Fail
        # closed if that changes: an unguarded pool would fetch internal addresses.
        if type(getattr(self, "_pool", None)) is not httpcore.ConnectionPool:
            raise RuntimeError("httpx.HTTPTransport has no `_pool` ConnectionPool: cannot guard connections")
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=shared_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )
