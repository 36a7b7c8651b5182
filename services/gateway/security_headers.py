"""Headers that keep browsers from misusing the gateway's answers.

Every answer says: no MIME sniffing, never in a frame (clickjacking the console), no Referer out
of it (a presigned link in a Referer is a download anyone can use). Console pages add a
Content-Security-Policy that allows only the console's own script and styles and the object
store's images: an injected <script> or inline handler does not run.
"""

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.settings import Settings

ALWAYS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def console_policy(settings: Settings) -> str:
    """The console's CSP: its thumbnails are presigned links to the object store's public host."""
    public = urlsplit(settings.s3_public_endpoint or settings.s3_endpoint)
    images = f"{public.scheme}://{public.netloc}" if public.netloc else ""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src 'self' {images}".strip(),
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *ALWAYS]
            await send(message)

        await self.app(scope, receive, send_with_headers)
