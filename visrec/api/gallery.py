"""The web gallery's page (`GET /`): static HTML and a little JS that browse, search and page through the
products over the API itself, with the key it asks for.

The page holds no data, so it is served without a key; the one setting it shows (the currency) is
written into it here. Its Content-Security-Policy lets only its own script and style run and only this
service's paths and the photos' blob URLs load: whatever a catalogue holds stays text."""

from __future__ import annotations

import base64
import hashlib
import html
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from visrec.api.deps import ServiceDep

PAGE = Path(__file__).parent.parent / "static" / "gallery.html"
CURRENCY = '<meta name="visrec-currency" content="">'

router = APIRouter()


@dataclass(frozen=True)
class Page:
    html: str
    headers: dict[str, str]


def gallery_page(currency: str | None) -> Page:
    """The page with `currency` (already checked by the settings: three letters) written in, and the
    headers that keep it to its own script and style."""
    text = PAGE.read_text(encoding="utf-8")  # 15 kB, read per request: no state kept at import
    if CURRENCY not in text:
        raise ValueError(f"{PAGE.name} lacks its currency tag {CURRENCY!r}")
    text = text.replace(CURRENCY, f'<meta name="visrec-currency" content="{html.escape(currency or "")}">')
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(text, 'script')}",
            f"style-src {_hashes(text, 'style')}",
            "img-src 'self' blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",  # the currency is a setting: a restart may change it
    }
    return Page(text, headers)


def _hashes(text: str, tag: str) -> str:
    """The CSP source list allowing exactly the page's inline `<tag>` blocks (and nothing injected)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return (
        " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)
        or "'none'"
    )


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
def gallery(service: ServiceDep) -> HTMLResponse:
    """The web gallery: browse, search and page through the products, pick one or upload a photo, see its
    neighbours."""
    page = gallery_page(service.settings.api.currency)
    return HTMLResponse(page.html, headers=page.headers)
