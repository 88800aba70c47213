"""Fetch catalogue image URLs without letting a catalogue reach inside the network.

Threat model: whoever writes a catalogue chooses the URLs the ingest pod requests. Without checks a row can
point at cloud metadata (169.254.169.254), loopback admin ports or cluster services (SSRF), directly, via a
redirect, or via a name that resolves (or re-resolves: DNS rebinding) to such an address; and error messages
that differ by what answered turn ingestion into a port scanner. So:

- `visrec.urls.check_url` refuses, before any network access, what is not a plain http(s) URL to a valid
  host on an allowed port, and literal IPs that are not public (every spelling: IPv4-mapped IPv6, ...);
- the connection itself is checked (`visrec.connect`): the host is resolved once, every address must be
  public (or allowed), and the socket connects to that checked address, so no second lookup can answer
  differently. Every redirect hop goes through both checks. A refusal reads the same whatever listens
  there, and is made before any packet goes to the address;
- one deadline bounds a whole fetch (lookup, connect, TLS, redirects, retries, body), the body is bounded
  in size, and a per-host circuit breaker stops a dead host from costing every one of its images a timeout;
- the body is bounded as it streams, twice: the bytes on the wire, and the bytes a Content-Encoding the
  server used anyway (identity is asked for) decodes to, each step of each decoder bounded in output
  (`_Decoding`): a 58 KB gzip answer once made 141 MB before the limit saw it.

Hosts listed in `allowed_hosts` (names or CIDRs) are trusted: they may resolve anywhere and use any port.
"""

from __future__ import annotations

import math
import os
import random
import re
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Literal

import httpx

from visrec.connect import GuardedBackend, GuardedTransport, Refused
from visrec.errors import ImageError
from visrec.urls import (
    FetchPolicy,
    check_url,
    clip,
    non_public,
    redacted,
)

_Health = Literal["ok", "bad", "none"]

_BACKOFF_BASE_S, _BACKOFF_MAX_S = 0.2, 5.0
_MAX_TRACKED_HOSTS = 10_000  # breaker entries kept; a catalogue of many dead hosts must not grow memory


def _host_key(url: httpx.URL) -> str:
    host = url.raw_host.decode("ascii").rstrip(".")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{url.port}" if url.port else host


class _BadLocation(Exception):
    """A redirect's Location is no URL. Raised from a response hook, before httpx turns it into a
    RemoteProtocolError that would look like a transient network failure."""


def _check_location(response: httpx.Response) -> None:
    if response.has_redirect_location:
        location = response.headers["Location"]
        try:
            httpx.URL(location)
        except Exception as exc:
            raise _BadLocation(location) from exc


# --- the circuit breaker -------------------------------------------------------------------------------


@dataclass
class _HostState:
    failures: int = 0  # consecutive failed fetches
    open_until: float = 0.0  # monotonic time the open circuit lets a trial through
    trial: bool = False  # a half-open trial request is in flight


class _Breaker:
    """Per-host consecutive failures; open hosts are skipped until their cooldown ends, then one trial
    request decides: success closes the circuit, failure re-opens it."""

    def __init__(self, threshold: int, cooldown_s: float) -> None:
        self._threshold, self._cooldown_s = threshold, cooldown_s
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostState] = {}

    def admit(self, host: str) -> tuple[bool, str | None]:
        """(whether this request is the trial of an open circuit, why it is skipped or None)."""
        with self._lock:
            state = self._hosts.get(host)
            if state is None or state.failures < self._threshold:
                return False, None
            left = state.open_until - time.monotonic()
            if left > 0 or state.trial:
                after = f"{math.ceil(max(left, 0) * 10) / 10:g}s"
                if state.trial:
                    after += " (a trial request is in flight)"
                return (
                    False,
                    f"skipped: host {host} failed {state.failures} times in a row; retrying it after {after}",
                )
            state.trial = True
            return True, None

    def record(self, host: str, health: _Health) -> None:
        with self._lock:
            if health == "ok":
                self._hosts.pop(host, None)
                return
            state = self._hosts.get(host)
            if health == "none":  # no evidence either way (e.g. refused before connecting)
                if state is not None:
                    state.trial = False
                return
            if state is None:
                if len(self._hosts) >= _MAX_TRACKED_HOSTS:
                    now = time.monotonic()
                    self._hosts = {h: s for h, s in self._hosts.items() if s.open_until > now}
                    if len(self._hosts) >= _MAX_TRACKED_HOSTS:
                        self._hosts.clear()
                state = self._hosts[host] = _HostState()
            state.failures += 1
            state.trial = False
            if state.failures >= self._threshold:
                state.open_until = time.monotonic() + self._cooldown_s


# --- the fetcher ---------------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying (network error, 5xx, 429), with the server's Retry-After if it gave one."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after


class _Answered(Exception):
    """The host answered, but not with a usable image (4xx, too large, bad redirect): final, host healthy."""


class _Deadline(Exception):
    """The fetch's deadline passed."""


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP-date), None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _backoff(attempt: int) -> float:
    # Full jitter, as tenacity's wait_random_exponential: workers retrying one host do not retry in step.
    return random.uniform(0, min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (attempt - 1)))


def _describe(exc: httpx.TransportError) -> str:
    detail = clip(str(exc) or type(exc).__name__)
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({detail})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the server's answer is not valid HTTP ({detail})"
    if isinstance(exc, httpx.ReadError):
        return f"the connection broke while reading ({detail})"
    return f"{type(exc).__name__}: {detail}"


class Fetcher:
    """Fetches image URLs under a `FetchPolicy`: one pooled httpx.Client per process (made lazily, and
    again in a forked worker), and the per-host circuit breaker. Thread-safe; picklable (the client and
    breaker state stay behind: a worker process starts with its own)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._breaker = _Breaker(self.policy.host_failures, self.policy.host_cooldown_s)
        self._http: httpx.Client | None = None
        self._backend: GuardedBackend | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"policy": self.policy}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.policy = state["policy"]
        self._start()

    def _client(self) -> tuple[httpx.Client, GuardedBackend]:
        if self._pid != os.getpid():
            # A forked child: the parent's sockets, locks (maybe held at fork time) and counts are not its.
            self._start()
        with self._lock:
            if self._http is None or self._backend is None:
                backend = GuardedBackend(self.policy)
                self._http = httpx.Client(
                    transport=GuardedTransport(backend),
                    # No proxy from the environment: a proxy would make the connection, unchecked.
                    trust_env=False,
                    follow_redirects=False,  # followed by hand, each hop checked
                    # No cookies: images need none, and one catalogue host must not set state for another.
                    cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
                    event_hooks={"response": [_check_location]},
                    # Images are compressed already; identity keeps the size limit on bytes as sent.
                    headers={
                        "User-Agent": "visrec-image-fetcher",
                        "Accept": "image/*",
                        "Accept-Encoding": "identity",
                    },
                )
                self._backend = backend
            return self._http, self._backend

    def close(self) -> None:
        with self._lock:
            if self._http is not None and self._pid == os.getpid():
                self._http.close()
            self._http = self._backend = None

    def fetch(self, url: str, max_bytes: int) -> bytes:
        """The body of `url`, at most `max_bytes`, within the policy's deadline; raises `ImageError` only."""
        shown = redacted(url) if isinstance(url, str) else repr(url)
        reason = check_url(url, self.policy)
        if reason is not None:
            raise ImageError(f"{shown}: refused: {reason}")
        deadline = time.monotonic() + self.policy.timeout_s
        try:
            client, backend = self._client()
            backend.set_deadline(deadline)
            try:
                return self._follow(client, url, shown, max_bytes, deadline)
            finally:
                backend.set_deadline(None)
        except ImageError:
            raise
        except Exception as exc:  # whatever a server makes httpx/httpcore do, the caller gets an ImageError
            raise ImageError(f"{shown}: unexpected error: {type(exc).__name__}: {clip(str(exc))}") from exc

    def _follow(self, client: httpx.Client, url: str, shown: str, max_bytes: int, deadline: float) -> bytes:
        hop, where = url, shown
        for _ in range(self.policy.max_redirects + 1):
            result = self._request(client, hop, where, max_bytes, deadline)
            if isinstance(result, bytes):
                return result
            hop = str(result)
            where = f"{shown} (redirected to {redacted(hop)})"
            reason = check_url(hop, self.policy)
            if reason is not None:
                raise ImageError(f"{where}: refused: {reason}")
        raise ImageError(f"{shown}: too many redirects (more than {self.policy.max_redirects})")

    def _request(
        self, client: httpx.Client, hop: str, where: str, max_bytes: int, deadline: float
    ) -> bytes | httpx.URL:
        """One hop: the body, or the URL it redirects to; retried on transient failures."""
        host = _host_key(httpx.URL(hop))
        trial, skipped = self._breaker.admit(host)
        if skipped is not None:
            raise ImageError(f"{where}: {skipped}")
        attempts = 1 if trial else max(1, self.policy.retries)  # a trial is one request, not a burst
        health: _Health = "none"
        try:
            for attempt in range(1, attempts + 1):
                try:
                    result = self._once(client, hop, max_bytes, deadline)
                    health = "ok"
                    return result
                except _Answered as exc:
                    health = "ok"  # the host works; this URL does not
                    raise ImageError(f"{where}: {exc}") from None
                except _Deadline:
                    health = "bad"
                    raise ImageError(f"{where}: took longer than {self.policy.timeout_s:g} s") from None
                except Refused as exc:
                    raise ImageError(f"{where}: refused: {non_public(exc.host)}") from None
                except _Transient as exc:
                    tries = f" ({attempt} attempts)" if attempt > 1 else ""
                    if attempt == attempts:
                        health = "bad"
                        raise ImageError(f"{where}: {exc.detail}{tries}") from None
                    wait = _backoff(attempt) if exc.retry_after is None else exc.retry_after
                    if time.monotonic() + wait >= deadline:
                        health = "bad"
                        asked = "" if exc.retry_after is None else f", the server asked for {wait:g} s"
                        raise ImageError(
                            f"{where}: {exc.detail}{tries}; no time left to retry within the "
                            f"{self.policy.timeout_s:g} s deadline{asked}"
                        ) from None
                    time.sleep(wait)
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            self._breaker.record(host, health)

    def _once(self, client: httpx.Client, hop: str, max_bytes: int, deadline: float) -> bytes | httpx.URL:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Deadline
        try:
            request = client.build_request("GET", hop, timeout=httpx.Timeout(left))
            response = client.send(request, stream=True)
            try:
                return self._read(response, max_bytes, deadline)
            finally:
                response.close()
        except _BadLocation as exc:
            raise _Answered(f"redirect to an invalid Location {clip(str(exc))!r}") from None
        except httpx.TimeoutException:
            raise _Deadline from None
        except httpx.TransportError as exc:
            if time.monotonic() >= deadline:
                raise _Deadline from None
            raise _Transient(_describe(exc)) from None
        except httpx.DecodingError as exc:
            raise _Answered(f"the response body cannot be decoded ({clip(str(exc))})") from None
        except httpx.InvalidURL as exc:  # a Location httpx parses but cannot resolve against the hop
            raise _Answered(f"redirect to an invalid Location ({clip(str(exc))})") from None

    def _read(self, response: httpx.Response, max_bytes: int, deadline: float) -> bytes | httpx.URL:
        status = response.status_code
        if response.next_request is not None:  # set by httpx for a redirect with a Location
            return response.next_request.url
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}", _retry_after(response.headers.get("Retry-After")))
        if not 200 <= status < 300:
            raise _Answered(f"HTTP {status}")
        length = response.headers.get("Content-Length", "").strip()
        if re.fullmatch(r"[0-9]{1,30}", length) and int(length) > max_bytes:
            raise _Answered(f"larger than {max_bytes} bytes (Content-Length: {int(length)})")
        decoding = _Decoding(response.headers.get("Content-Encoding", ""), max_bytes)
        size = 0
        for chunk in response.iter_raw():  # as sent: httpx's own decoding has no bound
            size += len(chunk)
            if size > max_bytes:
                raise _Answered(f"larger than {max_bytes} bytes")
            if time.monotonic() >= deadline:  # a server dripping bytes never trips a read timeout
                raise _Deadline
            decoding.feed(chunk)
        return decoding.end()


class _Decoding:
    """A body's Content-Encoding undone as it streams, never holding more than `limit` decoded bytes:
    every decompression step is asked for at most what is left of the limit plus one byte, so a bomb
    (a few KB that decode to gigabytes) is refused after `limit` bytes, not after it was inflated.
    gzip and deflate (zlib or raw, as browsers take it), in any order and number; identity; anything
    else (br, zstd, compress) is refused: identity was asked for, and no bounded decoder is at hand."""

    def __init__(self, header: str, limit: int) -> None:
        self.limit = limit
        self.out: list[bytes] = []
        self.size = 0
        layers = [e.strip().lower() for e in header.split(",") if e.strip().lower() not in ("", "identity")]
        unknown = [e for e in layers if e not in ("gzip", "x-gzip", "deflate")]
        if unknown:
            raise _Answered(f"unsupported Content-Encoding {clip(unknown[0], 40)!r} (identity was asked for)")
        # The last encoding listed was applied last: it is undone first.
        self.layers = [_Layer(encoding) for encoding in reversed(layers)]

    def feed(self, data: bytes, final: bool = False) -> None:
        for layer in self.layers:
            data = layer.run(data, self.limit - self.size + 1, final)
            if len(data) > self.limit - self.size:
                raise _Answered(f"larger than {self.limit} bytes once decoded ({layer.encoding})")
        self.size += len(data)
        if self.size > self.limit:
            raise _Answered(f"larger than {self.limit} bytes")
        if data:
            self.out.append(data)

    def end(self) -> bytes:
        if self.layers:
            self.feed(b"", final=True)
        return b"".join(self.out)


class _Layer:
    """One Content-Encoding, undone in bounded steps."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.raw_deflate = False  # "deflate" that turns out to lack the zlib header
        self.started = False
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS)

    def run(self, data: bytes, most: int, final: bool) -> bytes:
        """What `data` decodes to, at most `most` bytes (more would be refused anyway)."""
        try:
            if not self.started and data and self.encoding == "deflate":
                self.started = True
                try:
                    return self._step(data, most, final)
                except zlib.error:  # raw deflate, as some servers send it
                    self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._step(data, most, final)
        except zlib.error as exc:
            raise _Answered(
                f"the response body cannot be decoded ({self.encoding}: {clip(str(exc))})"
            ) from None

    def _step(self, data: bytes, most: int, final: bool) -> bytes:
        out = self._inflate.decompress(data, most)
        if final and len(out) < most:
            out += self._inflate.flush(most - len(out))
        return out
