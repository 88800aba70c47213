"""Whether `visrec serve` may listen where it was told: checked by the CLI before the app is built, so a
service open to the network without an API key never starts by accident."""

from __future__ import annotations

import ipaddress
import logging

from visrec.config import ApiSettings
from visrec.errors import VisrecError

log = logging.getLogger(__name__)


class ExposureRefused(VisrecError):
    """`visrec serve` would listen beyond loopback without an API key: a configuration error, exit 2 like
    the CLI's other usage errors (it was 1, the code of a bug)."""

    exit_code = 2


def check_exposure(api: ApiSettings) -> None:
    """Refuse to listen beyond loopback with no API key unless `api.insecure`; then say so loudly.
    Raises `ExposureRefused`."""
    if api.api_key is not None or _is_loopback(api.host):
        return
    if not api.insecure:
        raise ExposureRefused(
            f"refusing to serve on {api.host} without an API key: anyone who reaches it could query the "
            "catalogue. Set VISREC_API__API_KEY (callers send it as X-API-Key), listen on 127.0.0.1, "
            "or pass --insecure (VISREC_API__INSECURE=true) if something in front of it authenticates"
        )
    log.warning("SERVING ON %s WITHOUT AN API KEY (--insecure): every route is open to the network", api.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
