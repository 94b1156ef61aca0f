"""The fleet page: `GET /` and its static files (server/web), served with strict security headers.

The page is plain files shipped in the package (no build step, nothing from another origin);
it reads everything through the public `workers.*` API with a token of its own sign-in.
"""

from pathlib import Path

from aiohttp import web

WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC_PREFIX = "/static"

# No inline script or style, no eval, nothing from another origin, not framed by anyone.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _is_page(request: web.Request) -> bool:
    return request.path == "/" or request.path.startswith(STATIC_PREFIX + "/")


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if _is_page(request):
        response.headers.update(SECURITY_HEADERS)
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith(("text/", "application/javascript")) and "charset" not in content_type:
            response.headers["Content-Type"] = f"{content_type}; charset=utf-8"
        # The files change with the server's version: always revalidate (ETag/Last-Modified).
        response.headers.setdefault("Cache-Control", "no-cache")


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


def setup(app: web.Application) -> None:
    """Add `/` and `/static/...`; call it before the API's catch-all route."""
    app.router.add_get("/", _index)
    app.router.add_static(STATIC_PREFIX, WEB_DIR)
    app.on_response_prepare.append(_add_security_headers)
