"""The HTML the server sends: every page is `static/page.html` around a body, with headers that keep it from
being framed, sniffed or made to run foreign scripts (no page has inline script or style)."""

from __future__ import annotations

import html
from importlib import resources

from fastapi.responses import HTMLResponse

STATIC = resources.files("lorax_lite.server") / "static"
# Read once at import: package files that never change, so no request reads the disk on the event loop.
PAGE_HTML = STATIC.joinpath("page.html").read_text()
CHAT_HTML = STATIC.joinpath("chat.html").read_text()
KEY_HTML = STATIC.joinpath("key.html").read_text()

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # a page lists what one key may use: never cached for the next user
}


def page(title: str, body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """`body` (HTML, already escaped) in the site's page, with the security headers."""
    return HTMLResponse(PAGE_HTML.replace("{{title}}", html.escape(title)).replace("{{body}}", body),
                        status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def key_page(headers: dict[str, str]) -> HTMLResponse:
    """The 401 page of a browser that sent no valid key: a form asking for one (static/auth.js then fetches
    the page again with the key as a bearer header)."""
    return page("API key needed", KEY_HTML, 401, headers)
