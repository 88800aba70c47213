"""visrec.urls: which image URLs `check_url` lets through (listed cases, allowed hosts, and any text or
URL-like string Hypothesis makes), and the fetch policy built from the settings."""

from __future__ import annotations

import ipaddress

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visrec import urls
from visrec.config import IngestSettings
from visrec.urls import FetchPolicy, check_url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1", "not a valid URL"),
        ("http://" + "a" * 64 + ".com/x.jpg", "is not valid"),
        ("http://exa\x00mple.com/x", "control character (U+0000)"),
        ("http://exa mple.com", "is not valid"),
        ("http://exa\tmple.com", "control character (U+0009)"),
        ("http://bü\u200bcher.de/", "not a valid URL"),
        ("ftp://x/y", "scheme 'ftp' is not http or https"),
        ("//example.com/x.jpg", "no http:// or https://"),
        ("http:///x.jpg", "no host name"),
        ("http://example.com:22/x", "port 22 is not allowed"),
        ("http://example.com:99999/x", "port 99999 is out of range"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 resolves to a non-public address"),
        ("http://[::ffff:127.0.0.1]/", "resolves to a non-public address"),
        ("http://[::1]/", "resolves to a non-public address"),
        ("http://[fe80::1%25eth0]/", "zone identifiers"),
        ("http://0x7f000001/", "resolves to a non-public address"),
        ("http://2130706433/", "resolves to a non-public address"),
        ("http://127.1/", "resolves to a non-public address"),
        ("http://10.0.0.1/", "resolves to a non-public address"),
        ("http://100.64.0.1/", "resolves to a non-public address"),
        ("http://[64:ff9b::a00:1]/", "resolves to a non-public address"),  # NAT64 of 10.0.0.1
        ("http://1.2.3.4.5/", "neither a valid name nor an IPv4 address"),
        ("http://u:p@example.com/", "user:password@"),
        ("http://example.com/" + "a" * 9000, "longer than 8192 characters"),
        ("HTTP://EXAMPLE.COM/a.jpg", None),
        ("https://images.example.com/a b.jpg?size=large", None),
        ("http://bücher.de/x.jpg", None),
        ("http://8.8.8.8/x.jpg", None),
        ("http://[64:ff9b::808:808]/x.jpg", None),  # NAT64 of 8.8.8.8
        ("http://example.com./x.jpg", None),
        ("https://example.com:443/x.jpg", None),
    ],
)
def test_check_url(url: str, reason: str | None) -> None:
    got = check_url(url, FetchPolicy())
    assert got is None if reason is None else got is not None and reason in got, got


def test_check_url_allowed_hosts() -> None:
    policy = FetchPolicy(allowed_hosts=("images.internal", "10.20.0.0/16", "bücher.de"))
    assert check_url("http://images.internal:8080/x.jpg", policy) is None  # any port for listed names
    assert check_url("http://10.20.3.4:9000/x.jpg", policy) is None
    assert check_url("http://[::ffff:10.20.3.4]/x.jpg", policy) is None
    assert check_url("http://xn--bcher-kva.de:8443/x.jpg", policy) is None
    assert "non-public" in (check_url("http://10.21.0.1/x.jpg", policy) or "")
    assert "port 8080" in (check_url("http://other.example:8080/x.jpg", policy) or "")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_check_url_never_raises_on_any_text(text: str) -> None:
    assert isinstance(check_url(text, FetchPolicy()), str | None)


_HOSTS = st.one_of(
    st.sampled_from(
        [
            "example.com",
            "127.0.0.1",
            "[::1]",
            "[::ffff:10.0.0.1]",
            "0x7f000001",
            "2130706433",
            "0177.0.0.1",
            "169.254.169.254",
            "[fe80::1%25eth0]",
            "bücher.de",
            "[::1",
            "localhost",
            "",
        ]
    ),
    st.from_regex(r"[a-zA-Z0-9.\-_\[\]:%@x]{0,24}", fullmatch=True),
    st.text(max_size=24),
)
_URLS = st.builds(
    lambda scheme, userinfo, host, port, path: f"{scheme}{userinfo}{host}{port}{path}",
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "file://", "//", "", "http:"]),
    st.sampled_from(["", "user@", "u:p@", "@"]),
    _HOSTS,
    st.one_of(st.just(""), st.integers(-5, 70_000).map(":{}".format), st.text(max_size=6).map(":".__add__)),
    st.one_of(st.just(""), st.text(max_size=30).map("/".__add__)),
)


@settings(max_examples=400, deadline=None)
@given(_URLS)
def test_check_url_on_url_like_strings(url: str) -> None:
    reason = check_url(url, FetchPolicy())
    assert reason is None or isinstance(reason, str)
    if reason is None:  # what passes is a plain http(s) URL on an allowed port, never a non-public literal
        parsed = httpx.URL(url)
        assert parsed.scheme in ("http", "https") and parsed.host and not parsed.userinfo
        assert (parsed.port or {"http": 80, "https": 443}[parsed.scheme]) in (80, 443)
        host = parsed.raw_host.decode().rstrip(".")
        literal = urls._numeric_ipv4(host) if ":" not in host else ipaddress.ip_address(host)
        assert literal is None or urls.is_public(literal)


def test_policy_from_settings() -> None:
    ingest = IngestSettings(
        allowed_hosts=["Images.Internal.", "10.0.0.0/8"],
        allowed_ports=[80, 443, 8443],
        fetch_timeout_s=4,
        fetch_retries=2,
        max_redirects=3,
        host_failures=7,
        host_cooldown_s=30,
    )
    policy = FetchPolicy.from_settings(ingest)
    assert policy == FetchPolicy(4, 2, ("images.internal", "10.0.0.0/8"), (80, 443, 8443), 3, 7, 30)
    assert check_url("http://images.internal:1234/x.jpg", policy) is None
