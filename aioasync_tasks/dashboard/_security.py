"""The dashboard's guards: HTTP basic authentication of every request (when configured),
security headers on every response, and the checks of a POST (the app's secret form token and
the same-origin check)."""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import ConfigurationError

SECURITY_HEADERS = [
    # Only the dashboard's own scripts, styles and connections; no framing (clickjacking of the
    # action buttons), forms post only to the dashboard.
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
        b"base-uri 'none'; object-src 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True, slots=True)
class Credentials:
    """The user name and password of HTTP basic authentication."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def of(cls, auth: tuple[str, str] | None) -> Credentials | None:
        if auth is None:
            return None
        if (
            not isinstance(auth, tuple)
            or len(auth) != 2
            or not all(isinstance(part, str) and part for part in auth)
        ):
            raise ConfigurationError("auth must be a (user, password) tuple of non-empty strings")
        if ":" in auth[0]:
            raise ConfigurationError("the user name of auth cannot contain ':'")
        return cls(auth[0], auth[1])

    def accepts(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries these credentials (compared in constant
        time)."""
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_password = hmac.compare_digest(password.encode(), self.password.encode())
        return bool(sep) and ok_user and ok_password


class Guard:
    """ASGI middleware: basic authentication of every HTTP request when ``credentials`` are
    set, and the security headers on every response."""

    def __init__(self, app: ASGIApp, credentials: Credentials | None) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.credentials is not None:
            header = None
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    header = value.decode("latin-1")
            if not self.credentials.accepts(header):
                await _unauthorized(send)
                return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


async def _unauthorized(send: Send) -> None:
    body = b"authentication required\n"
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"www-authenticate", b'Basic realm="aioasync_tasks", charset="UTF-8"'),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def form_token(secret: str | None) -> str:
    """The app's secret form token: in a hidden field of every form, checked on every POST.
    Random unless ``secret`` is given; from the same ``secret``, the same token, so that the
    processes of one dashboard served by several workers accept each other's forms."""
    if secret is None:
        return secrets.token_urlsafe(32)
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigurationError("secret must be a str of at least 16 characters")
    digest = hmac.new(secret.encode(), b"aioasync_tasks dashboard form token", "sha256")
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def post_refusal(request: Request, form_token: str, sent_token: str | None) -> str | None:
    """Why a POST is refused (a cross-site request, or no or a wrong form token), or None."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in {"same-origin", "none"}:
        return f"a {fetch_site} request"
    host = request.headers.get("host")
    origin = request.headers.get("origin")
    if origin is not None and (origin == "null" or origin.split("://", 1)[-1] != host):
        return "a request from another origin"
    if origin is None:
        referer = request.headers.get("referer")
        if referer is not None and referer.split("://", 1)[-1].split("/", 1)[0] != host:
            return "a request from another origin"
    if not sent_token or not hmac.compare_digest(sent_token.encode(), form_token.encode()):
        return "a form without the dashboard's token (reload the page)"
    return None
