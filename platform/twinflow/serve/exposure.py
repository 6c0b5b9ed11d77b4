"""Who may call the service: the bind-address rule, Host and cross-site checks, token comparison, and
the headers every response carries. docs/security.md has the threat model these hold.

Cheap to import (no Ray, no torch): the CLI checks a plan with it before anything starts.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"


class ExposureError(ValueError):
    """The app would answer anyone on the network without authentication."""


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def normalise_token(token: str | None) -> str | None:
    """The configured and the presented token go through this same step before comparing."""
    token = (token or "").strip()
    return token or None


def check_exposure(bind_host: str, auth: str | None, token: str | None, where: str) -> None:
    """Refuse a non-loopback bind without a token unless the config says `auth: none`."""
    token = normalise_token(token)
    if auth == "token" and not token:
        raise ExposureError(f"{where}: auth is 'token' but the token variable is unset or empty")
    if auth == "none":
        if not is_loopback(bind_host):
            log.warning(
                "%s: serving on %s with auth: none, so anyone who reaches this port can use it",
                where,
                bind_host,
            )
        return
    if not token and not is_loopback(bind_host):
        raise ExposureError(
            f"{where}: binding {bind_host} (not loopback) without a bearer token: set the token "
            f"variable (auth_token_env), or say `auth: none` in the app args to serve openly on purpose"
        )


def default_allowed_hosts(bind_host: str) -> list[str]:
    """Host names a request may name: loopback binds answer only loopback names (a DNS-rebinding
    page reaches 127.0.0.1 under its own name); other binds any, unless the config lists them."""
    return list(LOOPBACK_NAMES) if is_loopback(bind_host) else [ANY_HOST]


def host_name(authority: str) -> str:
    """`host[:port]` or `[v6]:port` -> the lower-case host without the port."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def host_allowed(authority: str | None, allowed: list[str]) -> bool:
    if ANY_HOST in allowed:
        return True
    if not authority:
        return False
    name = host_name(authority)
    return any(name == a.strip("[]").lower() for a in allowed)


def cross_site(headers, authority: str | None) -> bool:
    """A browser request another site's page made: `Sec-Fetch-Site: cross-site`, or an Origin whose
    host:port differs from the Host it was sent to (older browsers send only Origin)."""
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        return True
    origin = headers.get("origin")
    if not origin or origin == "null":
        return origin == "null"  # sandboxed frames and file: pages send "null"
    return urlsplit(origin).netloc.lower() != (authority or "").lower()


def tokens_match(presented: str | None, configured: str | None) -> bool:
    presented, configured = normalise_token(presented), normalise_token(configured)
    if not presented or not configured:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), configured.encode("utf-8"))


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def script_string(value: str) -> str:
    """`value` as a JS string literal that is safe inside an HTML <script>: no `</script>`, `<!--`
    or line separators can end the element or the string."""
    text = json.dumps(value)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


def page_headers(nonce: str) -> dict[str, str]:
    """The playground's policy: its one inline script by nonce, fetches to this origin only, no framing."""
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
            "frame-ancestors 'none'"
        ),
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


class SecurityHeaders:
    """ASGI middleware: `X-Content-Type-Options: nosniff` on every response (a PNG or JSON answer is
    never re-read as HTML or script)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            await send(message)

        return await self.app(scope, receive, send_with_headers)
