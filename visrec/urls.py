"""Image URLs that a catalogue may make visrec fetch: the policy and the checks made before any network
access (see `visrec.fetch` for the threat model and the checks made when connecting).

Refused before any network access: what is not a plain http(s) URL to a valid host on an allowed port,
and literal IPs that are not public, in every spelling (IPv4-mapped IPv6, 0x7f000001, 2130706433, ...).
Hosts listed in `allowed_hosts` (names or CIDRs) are trusted: they may resolve anywhere and use any port.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from visrec.config import IngestSettings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT = IngestSettings()
_MAX_URL_CHARS = 8192
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.IGNORECASE)
_USERINFO = re.compile(r"^([^:/?#]*://)[^/?#]*@")
# Where an image may be fetched from, read from IANA's registries rather than from Python's `ipaddress`
# flags (which lag them: 192.0.0.0/24 and fec0::/10 counted as public). IPv4: every block of the IANA
# IPv4 Special-Purpose Address Registry that is not globally reachable, with multicast and limited
# broadcast; the registry's globally reachable blocks (AS112, AMT) stay public. IPv6: only global unicast
# (2000::/3, the IANA IPv6 Address Space registry) is public — that alone refuses loopback, unspecified,
# discard-only, segment-routing SIDs, unique-local, link-local, the deprecated site-local and multicast —
# less the IPv6 Special-Purpose registry's blocks within it that are not globally reachable. Addresses
# that embed an IPv4 one (mapped, NAT64, 6to4) are judged by it.
_IPV4_NOT_GLOBAL = tuple(
    ipaddress.IPv4Network(block)
    for block in (
        "0.0.0.0/8",  # "this network" (RFC 791)
        "10.0.0.0/8",  # private use (RFC 1918)
        "100.64.0.0/10",  # shared address space: carrier-grade NAT, often cloud-internal (RFC 6598)
        "127.0.0.0/8",  # loopback (RFC 1122)
        "169.254.0.0/16",  # link local: cloud metadata (RFC 3927)
        "172.16.0.0/12",  # private use (RFC 1918)
        "192.0.0.0/24",  # IETF protocol assignments (RFC 6890): DS-Lite, NAT64 discovery, dummy, …
        "192.0.2.0/24",  # documentation, TEST-NET-1 (RFC 5737)
        "192.88.99.0/24",  # 6to4 relay anycast, deprecated (RFC 7526)
        "192.168.0.0/16",  # private use (RFC 1918)
        "198.18.0.0/15",  # benchmarking (RFC 2544)
        "198.51.100.0/24",  # documentation, TEST-NET-2 (RFC 5737)
        "203.0.113.0/24",  # documentation, TEST-NET-3 (RFC 5737)
        "224.0.0.0/4",  # multicast (RFC 5771)
        "240.0.0.0/4",  # reserved (RFC 1112)
        "255.255.255.255/32",  # limited broadcast (RFC 919)
    )
)
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_IPV6_NOT_GLOBAL = tuple(
    ipaddress.IPv6Network(block)
    for block in (
        "2001::/23",  # IETF protocol assignments (RFC 2928): Teredo, benchmarking, ORCHID, …
        "2001:db8::/32",  # documentation (RFC 3849)
        "3fff::/20",  # documentation (RFC 9637)
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # DNS64 answers for IPv4-only hosts on IPv6-only networks
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(ref: str) -> bool:
    """Whether an image reference is a URL (any scheme: `check_url` then allows only http and https)
    rather than a file path."""
    return _URL.match(ref) is not None


@dataclass(frozen=True)
class FetchPolicy:
    """What image fetches may reach, and how long and how often they may try."""

    # Defaults: IngestSettings' own.
    timeout_s: float = _DEFAULT.fetch_timeout_s  # total deadline per image: lookup, connect, redirects, …
    retries: int = _DEFAULT.fetch_retries  # attempts per request (each redirect hop), transient failures
    allowed_hosts: tuple[str, ...] = ()  # lower-case host names or CIDRs; may resolve anywhere, any port
    allowed_ports: tuple[int, ...] = tuple(_DEFAULT.allowed_ports)  # for every other host
    max_redirects: int = _DEFAULT.max_redirects
    host_failures: int = _DEFAULT.host_failures  # circuit breaker: failed fetches in a row open it
    host_cooldown_s: float = _DEFAULT.host_cooldown_s  # how long an open circuit refuses before a trial

    @classmethod
    def from_settings(cls, ingest: IngestSettings) -> FetchPolicy:
        return cls(
            timeout_s=ingest.fetch_timeout_s,
            retries=ingest.fetch_retries,
            allowed_hosts=tuple(ingest.allowed_hosts),
            allowed_ports=tuple(ingest.allowed_ports),
            max_redirects=ingest.max_redirects,
            host_failures=ingest.host_failures,
            host_cooldown_s=ingest.host_cooldown_s,
        )


def is_public(address: Address) -> bool:
    """Whether `address` is on the public internet, by IANA's registries (see `_IPV4_NOT_GLOBAL`);
    addresses embedding an IPv4 one are judged by it. Python's own flags must agree too."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address in _NAT64:
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None:
            return is_public(address.sixtofour)
        if address not in _IPV6_GLOBAL_UNICAST or any(address in n for n in _IPV6_NOT_GLOBAL):
            return False
    elif any(address in network for network in _IPV4_NOT_GLOBAL):
        return False
    return address.is_global and not (
        address.is_multicast
        or address.is_reserved
        or address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_unspecified
    )


def non_public(host: str) -> str:
    # One text for every non-public target, whether something listens there or not: no port scanning.
    return f"{host} resolves to a non-public address (allow it with VISREC_INGEST__ALLOWED_HOSTS)"


@functools.lru_cache(maxsize=64)
def allowlist(entries: tuple[str, ...]) -> tuple[frozenset[str], tuple[Network, ...]]:
    """`allowed_hosts` split into ASCII (IDNA) host names and networks; a bare IP is a one-address network."""
    names: set[str] = set()
    networks: list[Network] = []
    for raw in entries:
        entry = raw.strip().lower().rstrip(".")
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        try:  # "bücher.de" must match the xn-- form that URLs and connections carry
            names.add(httpx.URL(f"http://{entry}/").raw_host.decode("ascii").rstrip("."))
        except Exception:
            names.add(entry)
    return frozenset(names), tuple(networks)


def in_networks(address: Address, networks: Iterable[Network]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _ipv4_number(part: str) -> int:
    if re.fullmatch(r"0[xX][0-9a-fA-F]*", part):
        return int(part[2:] or "0", 16)
    if re.fullmatch(r"0[0-7]+", part):
        return int(part, 8)
    if re.fullmatch(r"0|[1-9][0-9]*", part):
        return int(part)
    raise ValueError(part)


def _numeric_ipv4(name: str) -> ipaddress.IPv4Address | None:
    """The address that resolvers (inet_aton) read in a numeric host such as 2130706433, 0x7f000001 or
    127.1; None for a host name. A name whose last label is numeric but is no such address raises
    ValueError, as in browsers' URL parsing."""
    labels = name.split(".")
    if not re.fullmatch(r"[0-9]+|0[xX][0-9a-fA-F]*", labels[-1]):
        return None
    if len(labels) > 4:
        raise ValueError(name)
    numbers = [_ipv4_number(label) for label in labels]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError(name)
    return ipaddress.IPv4Address(numbers[-1] + sum(n << (8 * (3 - i)) for i, n in enumerate(numbers[:-1])))


def check_url(url: str, policy: FetchPolicy) -> str | None:
    """Why `url` is refused before any network access, or None if it may be fetched. Never raises.

    Refused: unparseable URLs (bad brackets, host labels, IDNA, control characters, no host), schemes other
    than http/https, ports outside `allowed_ports` (unless the host is allowed), `user:password@` (it would
    be sent and echoed into logs and failure reports; image hosts use signed URLs instead), and literal IPs
    that are not public (unless allowed). Host names are only checked syntactically here: their addresses
    are checked when connecting.
    """
    try:
        return _check_url(url, policy)
    except Exception as exc:  # a string that trips a parser is no URL to fetch; the caller wants a reason
        return f"not a valid URL ({type(exc).__name__})"


def _check_url(url: str, policy: FetchPolicy) -> str | None:
    if not isinstance(url, str):
        return "not a text URL"
    if len(url) > _MAX_URL_CHARS:
        return f"longer than {_MAX_URL_CHARS} characters"
    for i, char in enumerate(url):
        if unicodedata.category(char) == "Cc":
            return f"contains a control character (U+{ord(char):04X}) at position {i}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"not a valid URL ({clip(str(exc))})"
    if parsed.scheme not in ("http", "https"):
        return f"scheme {parsed.scheme!r} is not http or https" if parsed.scheme else "no http:// or https://"
    if parsed.userinfo:
        return "user:password@ in an image URL is refused (it would be logged); use a signed URL"
    host = parsed.raw_host.decode("ascii")
    if not host:
        return "no host name"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not 1 <= port <= 65535:
        return f"port {port} is out of range"
    names, networks = allowlist(policy.allowed_hosts)
    address: Address | None
    if ":" in host:  # httpx strips the brackets of an IPv6 literal
        if "%" in host:
            return "IPv6 zone identifiers (%) are refused"
        address = ipaddress.IPv6Address(host)
        allowed = host in names or in_networks(address, networks)
    else:
        name = host[:-1] if host.endswith(".") else host  # a trailing dot is a fully qualified name
        try:
            address = _numeric_ipv4(name)
        except ValueError:
            return f"host {clip(host)!r} is neither a valid name nor an IPv4 address"
        if address is None and (
            len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split("."))
        ):
            return f"host name {clip(host)!r} is not valid (labels of 1-63 letters, digits, '-' or '_')"
        allowed = name in names or (address is not None and in_networks(address, networks))
    if address is not None and not allowed and not is_public(address):
        return non_public(host)
    if not allowed and port not in policy.allowed_ports:
        ports = ", ".join(map(str, policy.allowed_ports)) or "none"
        return (
            f"port {port} is not allowed (allowed: {ports}; see VISREC_INGEST__ALLOWED_PORTS, or list "
            "the host in VISREC_INGEST__ALLOWED_HOSTS)"
        )
    return None


def clip(text: str, limit: int = 200) -> str:
    """`text` made safe for a one-line message: control characters escaped, length bounded."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "…"


def redacted(url: str) -> str:
    """The URL as messages show it: credentials hidden (they would land in logs and failure reports)."""
    return clip(_USERINFO.sub(r"\1***@", url))
