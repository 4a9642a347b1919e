"""The `alssl label-ui` web server: Starlette + uvicorn, one random token per server, 127.0.0.1 by default.

Routes (every one but /static/* answers 403 without `?token=T` or an `X-Alssl-Token: T` header):

    GET  /                  the page (alssl/labeling/static/index.html)
    GET  /api/query         {"round", "classes", "items": [{"index", "id", "image", "suggestion", "score", "label"}],
                            ...}
    POST /api/label         {"index": i, "label": "dog"}   (label null clears it)
    POST /api/submit        200 + the import summary, or 409 + the missing / invalid items (nothing imported)
    POST /api/next          opens the next query (same strategy and budget); answers like /api/query
    GET  /img/<index>       a queried image (404 for every other index or name)
    GET  /static/<name>     app.js, app.css (no secrets in them)
"""

from __future__ import annotations

import hmac
import re
import secrets
import socket
from importlib import resources

from alssl.errors import UserError
from alssl.labeling.session import LabelSession

STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}
_INDEX = re.compile(r"[0-9]{1,12}")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _static(name: str) -> bytes:
    return resources.files("alssl.labeling").joinpath("static", name).read_bytes()


def make_app(session: LabelSession, token: str):
    """The Starlette app serving `session`; every API and image route checks `token` (constant-time)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def image_url(i: int) -> str:
        return f"/img/{i}?token={token}"

    def ok(request: Request) -> bool:
        given = request.query_params.get("token") or request.headers.get("x-alssl-token") or ""
        return hmac.compare_digest(given.encode(), token.encode())

    def js(status: int, data: dict) -> JSONResponse:
        return JSONResponse(data, status_code=status, headers={**HEADERS, "Cache-Control": "no-store"})

    async def call(fn, *args) -> JSONResponse:
        """A session call's answer: (status, data), or data (200); a UserError (a damaged state.json, ...) is a 409
        with its message, never a 500."""
        try:
            res = await run_in_threadpool(fn, *args)
        except UserError as exc:
            return js(409, {"error": str(exc)})
        return js(200, res) if isinstance(res, dict) else js(*res)

    def forbidden() -> JSONResponse:
        return js(403, {"error": "missing or wrong token; open the URL that `alssl label-ui` printed"})

    async def body(request: Request) -> dict | None:
        try:
            data = await request.json()
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            return None
        return data if isinstance(data, dict) else None

    async def index(request: Request) -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8",
                        headers={**HEADERS, "Cache-Control": "no-store"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return js(404, {"error": "not found"})
        return Response(_static(name), media_type=STATIC[name], headers={**HEADERS, "Cache-Control": "no-cache"})

    async def api_query(request: Request) -> Response:
        return await call(session.payload, image_url)

    async def api_label(request: Request) -> Response:
        data = await body(request)
        if data is None or "index" not in data or "label" not in data:
            return js(400, {"error": 'send JSON {"index": <pool index>, "label": "<class>" or null}'})
        return await call(session.set_label, data["index"], data["label"])

    async def api_submit(request: Request) -> Response:
        return await call(session.submit)

    async def api_next(request: Request) -> Response:
        return await call(session.next_query, image_url)

    async def image(request: Request) -> Response:
        name = request.path_params["index"]
        found = await run_in_threadpool(session.image, int(name)) if _INDEX.fullmatch(name) else None
        if found is None:
            return js(404, {"error": "not an image of the open query"})
        data, media = found
        return Response(data, media_type=media, headers={**HEADERS, "Cache-Control": "private, max-age=3600"})

    async def fallback(request: Request) -> Response:
        return js(404, {"error": "not found"})

    def guarded(handler):
        """`handler` behind the token: 403 without it."""
        async def checked(request: Request) -> Response:
            return await handler(request) if ok(request) else forbidden()
        return checked

    routes = [
        Route("/", guarded(index)),
        Route("/static/{name}", static),
        Route("/api/query", guarded(api_query)),
        Route("/api/label", guarded(api_label), methods=["POST"]),
        Route("/api/submit", guarded(api_submit), methods=["POST"]),
        Route("/api/next", guarded(api_next), methods=["POST"]),
        Route("/img/{index}", guarded(image)),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/{rest:path}", guarded(fallback), methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    ]
    return Starlette(routes=routes)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port); a clear UserError when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host} cannot be resolved ({exc.strerror}); use 127.0.0.1 (the default)") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = "pass another --port (or --port 0 for any free one)" if port else "check --host"
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); {hint}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str, token: str) -> str:
    port = sock.getsockname()[1]
    shown = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/?token={token}"


def serve(app, sock: socket.socket) -> None:
    """Run until Ctrl-C / SIGTERM (uvicorn re-raises the signal after a graceful shutdown)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])


def serve_page(session: LabelSession, sock: socket.socket, host: str, *, browser: bool, say,
               stop: tuple[type[BaseException], ...] = (KeyboardInterrupt,)) -> None:
    """`alssl label-ui`: serve `session` on `sock` with a fresh token until Ctrl-C (or an exception in `stop`), telling
    the person (`say(text, err)`) the URL, the progress and, at the end, what is left; opens a browser when asked and
    one is there. Closes the socket."""
    import os
    import sys

    from alssl.errors import warn

    token = new_token()
    url = url_of(sock, host, token)
    if host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"listening on {host}: other machines that can reach it can open the page with the URL's token")
    say(url, False)
    say(f"# round {session.round}: {len(session.labels())} / {len(session.indices)} labeled; every label is saved at "
        f"once to {session.partial}; Ctrl-C stops the server", True)
    if browser and (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY")
                    or os.environ.get("WAYLAND_DISPLAY")):
        import threading
        import webbrowser

        threading.Timer(0.5, webbrowser.open, [url]).start()
    try:
        serve(make_app(session, token), sock)
    except stop:
        pass
    finally:
        sock.close()
    left = len(session.indices) - len(session.labels())
    done = f"round {session.round} is imported" if session.result else (
        f"{left} image(s) of round {session.round} still to label: rerun `alssl label-ui {session.run_dir}` to go on")
    say(f"# stopped; {done}", True)
