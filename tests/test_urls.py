"""visrec.urls: which image URLs `check_url` lets through (listed cases, allowed hosts, and any text or
URL-like string Hypothesis makes), and the fetch policy built from the settings."""

from __future__ import annotations

import ipaddress
import socket

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
@given(st.one_of(st.text(), st.text().map("http://".__add__)))
def test_any_text_is_judged_by_the_checks_not_by_the_catch_all(text: str) -> None:
    """`check_url` turns any exception into a reason, so "it never raises" proves nothing: the checks
    under it must judge any text themselves (raise nothing), and their answer is what `check_url` says."""
    reason = urls._check_url(text, FetchPolicy())
    assert reason is None or (isinstance(reason, str) and reason), reason
    assert check_url(text, FetchPolicy()) == reason


def test_a_check_that_trips_is_a_refusal_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def trips(url: str, policy: FetchPolicy) -> str | None:
        raise IndexError("tripped")

    monkeypatch.setattr(urls, "_check_url", trips)
    assert check_url("http://example.com/", FetchPolicy()) == "not a valid URL (IndexError)"


# Numeric hosts as resolvers read them (inet_aton: 1 to 4 parts, each decimal, 0-prefixed octal or
# 0x-prefixed hex; the last part fills the remaining bytes), written out by hand, and whether the address
# is public by the IANA IPv4 Special-Purpose Address Registry.
NUMERIC_HOSTS = [
    # host, the address it names, public
    ("127.1", "127.0.0.1", False),  # loopback, 127.0.0.0/8
    ("0177.1", "127.0.0.1", False),  # octal 0177 = 127
    ("0177.0.1", "127.0.0.1", False),
    ("00000177.1", "127.0.0.1", False),
    ("0x7f.1", "127.0.0.1", False),
    ("0X7F.0.0.1", "127.0.0.1", False),
    ("0x7f.0x0.0x0.0x1", "127.0.0.1", False),
    ("017700000001", "127.0.0.1", False),  # one octal number: 0o17700000001 = 2130706433
    ("0x7f000001", "127.0.0.1", False),
    ("2130706433", "127.0.0.1", False),
    ("0177.0x1", "127.0.0.1", False),
    ("012.1", "10.0.0.1", False),  # private use, 10.0.0.0/8; octal 012 = 10
    ("0xa.1", "10.0.0.1", False),
    ("012.0x0.01", "10.0.0.1", False),
    ("0251.0376.0xa9fe", "169.254.169.254", False),  # link local: cloud metadata; 0251 = 169, 0376 = 254
    ("0xa9fea9fe", "169.254.169.254", False),
    ("025177524776", "169.254.169.254", False),
    ("0300.0250.0x101", "192.168.1.1", False),  # private use, 192.168.0.0/16; 0300 = 192, 0250 = 168
    ("0254.020.1", "172.16.0.1", False),  # private use, 172.16.0.0/12; 0254 = 172, 020 = 16
    ("0144.0100.1", "100.64.0.1", False),  # shared address space, 100.64.0.0/10; 0144 = 100, 0100 = 64
    ("0", "0.0.0.0", False),  # "this network", 0.0.0.0/8
    ("0x0", "0.0.0.0", False),
    ("00", "0.0.0.0", False),
    ("0340.1", "224.0.0.1", False),  # multicast; 0340 = 224
    ("0377.0377.0xffff", "255.255.255.255", False),  # limited broadcast
    ("010.1", "8.0.0.1", True),  # octal 010 = 8: public, where decimal would read private 10.0.0.1
    ("010.010.0x808", "8.8.8.8", True),
    ("01002004010", "8.8.8.8", True),  # 0o1002004010 = 134744072
    ("0x8.0x8.0x8.0x8", "8.8.8.8", True),
    ("134744072", "8.8.8.8", True),
    ("0x8080808", "8.8.8.8", True),
    ("01.02.0x304", "1.2.3.4", True),
    ("0xd8.072.0330", "216.58.0.216", True),  # 072 = 58, 0330 = 216
]


@pytest.mark.parametrize(("host", "address", "public"), NUMERIC_HOSTS)
def test_numeric_hosts_in_every_base_are_checked_before_any_packet(
    host: str, address: str, public: bool
) -> None:
    """The check made before any packet (`check_url` itself, not through an HTTP client that refuses
    some forms first) reads each part of a numeric host in its own base: 0177.1 is loopback, as the
    resolver that would connect reads it, not 177.0.0.1; and 010.1 is public 8.0.0.1, not 10.0.0.1."""
    ip = ipaddress.IPv4Address(address)  # the table against Python's own flags (multicast counts global)
    assert (ip.is_global and not ip.is_multicast) is public
    try:  # and against the C library's inet_aton, where it reads these forms (glibc, musl, BSD)
        resolver = socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        resolver = address
    assert resolver == address, (host, resolver)
    for url in (f"http://{host}/x.jpg", f"https://{host}./x.jpg", f"http://{host.upper()}:443/"):
        reason = check_url(url, FetchPolicy())
        if public:
            assert reason is None, (url, reason)
        else:
            assert reason is not None and "non-public address" in reason, (url, reason)
            assert check_url(url, FetchPolicy(allowed_hosts=(f"{address}/32",))) is None, url
    assert urls._numeric_ipv4(host) == ip


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


# IANA's registries, restated here (not imported from visrec.urls) so that the test checks the policy.
# IPv4 Special-Purpose Address Registry: blocks not globally reachable, plus multicast and broadcast.
IANA_V4_NOT_PUBLIC = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
]
IANA_V4_GLOBAL_SPECIAL = ["192.31.196.0/24", "192.52.193.0/24", "192.175.48.0/24"]  # AS112, AMT
# IPv6: global unicast is 2000::/3 (Address Space registry), less these Special-Purpose blocks.
IANA_V6_NOT_PUBLIC_IN_2000 = ["2001::/23", "2001:db8::/32", "3fff::/20"]
V6_OUTSIDE_2000 = [
    "::/128",
    "::1/128",
    "100::/64",
    "5f00::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
]


def _corners(block: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    network = ipaddress.ip_network(block)
    return [network.network_address, network.broadcast_address, network[network.num_addresses // 2]]


@pytest.mark.parametrize("block", IANA_V4_NOT_PUBLIC + IANA_V6_NOT_PUBLIC_IN_2000 + V6_OUTSIDE_2000)
def test_every_special_purpose_block_is_refused(block: str) -> None:
    for address in _corners(block):
        assert not urls.is_public(address), address
        host = f"[{address}]" if address.version == 6 else str(address)
        reason = check_url(f"http://{host}/x.jpg?sig=1", FetchPolicy())
        assert reason is not None and "non-public" in reason, (address, reason)


@pytest.mark.parametrize("block", [*IANA_V4_GLOBAL_SPECIAL, "2620:4f:8000::/48", "2a00::/12"])
def test_globally_reachable_special_blocks_are_public(block: str) -> None:
    assert all(urls.is_public(address) for address in _corners(block))


@settings(max_examples=500, deadline=None)
@given(st.ip_addresses(v=4))
def test_ipv4_policy_is_the_registry(address: ipaddress.IPv4Address) -> None:
    expected = not any(address in ipaddress.ip_network(block) for block in IANA_V4_NOT_PUBLIC)
    assert urls.is_public(address) == expected, address
    assert urls.is_public(ipaddress.IPv6Address(f"::ffff:{address}")) == expected  # mapped
    assert urls.is_public(ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80))) == expected  # 6to4
    assert urls.is_public(ipaddress.IPv6Address((0x64FF9B << 96) | int(address))) == expected  # NAT64


@settings(max_examples=500, deadline=None)
@given(st.ip_addresses(v=6))
def test_ipv6_policy_is_the_registry(address: ipaddress.IPv6Address) -> None:
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is None and address in ipaddress.ip_network("64:ff9b::/96"):
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is not None:
        expected = not any(embedded in ipaddress.ip_network(block) for block in IANA_V4_NOT_PUBLIC)
    else:
        expected = address in ipaddress.ip_network("2000::/3") and not any(
            address in ipaddress.ip_network(block) for block in IANA_V6_NOT_PUBLIC_IN_2000
        )
    assert urls.is_public(address) == expected, address


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("0X7F000001", "127.0.0.1"),  # the hex prefix and digits in either case
        ("0x7F.1", "127.0.0.1"),
        ("0x", "0.0.0.0"),  # a bare prefix is 0, as browsers' URL parsing reads it (glibc refuses it)
        ("0x.0x.0x.0x", "0.0.0.0"),
        ("1.2.3.255", "1.2.3.255"),
        ("1.2.65535", "1.2.255.255"),
        ("1.16777215", "1.255.255.255"),
        ("255.255.255.255", "255.255.255.255"),
    ],
)
def test_numeric_hosts_read_as_resolvers_read_them(host: str, address: str) -> None:
    assert urls._numeric_ipv4(host) == ipaddress.IPv4Address(address)
    if not host.startswith("0x."):  # what a resolver would reach
        assert host == "0x" or socket.inet_aton(host) == ipaddress.IPv4Address(address).packed


@pytest.mark.parametrize(
    "host", ["1.2.3.256", "1.2.65536", "1.16777216", "0.256.1", "1.2.999.4", "256.1.1.1", "1.2.3.4.0", "0x1g"]
)
def test_numeric_hosts_out_of_range_are_refused(host: str) -> None:
    """Each label but the last is one byte; the last fills the bytes left; at most four labels. A host
    whose last label is numeric and breaks these is no host at all (as in browsers): refused, by httpx's
    parser (a dotted quad) or by ours (the other forms, which httpx takes for names)."""
    reason = check_url(f"http://{host}/x.jpg", FetchPolicy())
    if host == "0x1g":  # the last label is no number: a host name
        assert reason is None and urls._numeric_ipv4(host) is None
        return
    assert reason is not None and ("neither a valid name" in reason or "Invalid IPv4" in reason), reason
    with pytest.raises(ValueError):
        urls._numeric_ipv4(host)
    with pytest.raises(OSError):
        socket.inet_aton(host)


def test_reasons_are_exact_at_their_edges() -> None:
    assert check_url(123, FetchPolicy()) == "not a text URL"  # type: ignore[arg-type]
    base = "http://example.com/"
    longest = base + "a" * (8192 - len(base))
    assert check_url(longest, FetchPolicy()) is None
    assert check_url(longest + "a", FetchPolicy()) == "longer than 8192 characters"
    with pytest.raises(httpx.InvalidURL) as invalid:
        httpx.URL("http://[::1")
    assert check_url("http://[::1", FetchPolicy()) == f"not a valid URL ({invalid.value})"


PORTS = "see VISREC_INGEST__ALLOWED_PORTS, or list the host in VISREC_INGEST__ALLOWED_HOSTS"


@pytest.mark.parametrize(
    ("url", "policy", "reason"),
    [
        ("//example.com/x.jpg", FetchPolicy(), "no http:// or https://"),
        ("http:///x.jpg", FetchPolicy(), "no host name"),
        (
            "http://u:p@example.com/",
            FetchPolicy(),
            "user:password@ in an image URL is refused (it would be logged); use a signed URL",
        ),
        ("http://[fe80::1%25eth0]/", FetchPolicy(), "IPv6 zone identifiers (%) are refused"),
        ("http://example.com:1/", FetchPolicy(), f"port 1 is not allowed (allowed: 80, 443; {PORTS})"),
        (
            "http://example.com:65535/",
            FetchPolicy(),
            f"port 65535 is not allowed (allowed: 80, 443; {PORTS})",
        ),
        ("http://example.com:65536/", FetchPolicy(), "port 65536 is out of range"),
        (
            "http://example.com:8080/",
            FetchPolicy(allowed_ports=()),
            f"port 8080 is not allowed (allowed: none; {PORTS})",
        ),
        # No port: the scheme's own, checked like any other.
        (
            "https://example.com/",
            FetchPolicy(allowed_ports=(80,)),
            f"port 443 is not allowed (allowed: 80; {PORTS})",
        ),
        ("http://example.com/", FetchPolicy(allowed_ports=(80,)), None),
        (
            "http://example.com/",
            FetchPolicy(allowed_ports=(443,)),
            f"port 80 is not allowed (allowed: 443; {PORTS})",
        ),
        ("https://example.com/", FetchPolicy(allowed_ports=(443,)), None),
        ("http://example.com:1/", FetchPolicy(allowed_ports=(1, 65535)), None),
        ("http://example.com:65535/", FetchPolicy(allowed_ports=(1, 65535)), None),
    ],
)
def test_reasons_word_for_word(url: str, policy: FetchPolicy, reason: str | None) -> None:
    """What a failure report says is what the operator reads: each reason whole, ports at their edges."""
    assert check_url(url, policy) == reason


def test_a_host_name_is_at_most_253_characters() -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253
    assert check_url(f"http://{longest}/x.jpg", FetchPolicy()) is None
    assert check_url(f"http://{longest}./x.jpg", FetchPolicy()) is None  # the root's dot is no character
    reason = check_url(f"http://{longest}d/x.jpg", FetchPolicy())
    assert reason is not None and "is not valid (labels of 1-63" in reason
