"""The review page's ASGI app (Starlette, served by uvicorn): a grid over one run, decisions posted back.

Safe by default: every request needs the access token (`?token=` once, then an HttpOnly SameSite=Strict cookie;
or `Authorization: Bearer`), else 401; a POST also needs the page's CSRF token in `X-CSRF-Token`, a JSON body and,
when the browser sends one, an Origin of this server; images are addressed by (model, id, sample) and looked up
in the run's metadata, never by a path from the request; anything else is 404.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from importlib.resources import files
from typing import Any

import pyarrow.compute as pc
from promptmill.pipelines.review.decisions import best_per_group
from promptmill.pipelines.review.grid import Grid
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)
TOKEN_ENV = "PROMPTMILL_REVIEW_TOKEN"
REASONS = ["off-brand", "wrong product", "artifacts", "text or logo wrong", "near-duplicate", "unsafe"]
STATIC = {"review.js": "text/javascript", "review.css": "text/css"}  # the only files served: by name, from the package
CSP = "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _static(name: str) -> str:
    return files("promptmill.pipelines.review").joinpath("static", name).read_text()


class TokenGuard:
    """ASGI middleware: 401 without the token; `GET /?token=` sets the cookie and redirects to a clean URL."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token
        self.cookie = "promptmill_review_" + hashlib.sha256(token.encode()).hexdigest()[:10]  # one per server

    def _ok(self, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        req = Request(scope)
        auth = req.headers.get("authorization", "")
        given = req.query_params.get("token")
        if given is not None and req.method == "GET" and self._ok(given):
            resp: Response = RedirectResponse(req.url.remove_query_params("token"), status_code=303)
            resp.set_cookie(self.cookie, self.token, httponly=True, samesite="strict")
        elif self._ok(req.cookies.get(self.cookie)) or (auth.startswith("Bearer ") and self._ok(auth[7:])):
            return await self.app(scope, receive, send)
        else:
            resp = PlainTextResponse("401: missing or wrong access token (open the URL `promptmill review` printed)",
                                     status_code=401)
        await resp(scope, receive, send)


def build_app(grid: Grid, token: str, reviewer: str) -> Starlette:
    """The app over one opened run; `reviewer` signs this server's decisions."""
    csrf = hmac.new(token.encode(), b"csrf", hashlib.sha256).hexdigest()

    def headers(extra: dict | None = None) -> dict:
        return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store", **(extra or {})}

    async def page(request: Request) -> Response:
        html = _static("review.html").replace("{{csrf}}", csrf).replace("{{title}}", _escape(grid.run.url))
        return HTMLResponse(html, headers=headers())

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return PlainTextResponse("404", status_code=404)
        return Response(_static(name), media_type=STATIC[name], headers=headers())

    def meta(request: Request) -> Response:
        return JSONResponse({"run": grid.run.url, "rows": len(grid.table), "kept": grid.kept, "product": grid.product,
                             "scores": grid.scores, "facets": grid.facets, "reasons": REASONS, "reviewer": reviewer},
                            headers=headers())

    def items(request: Request) -> Response:
        try:
            q = grid.parse(request.query_params)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400, headers=headers())
        return JSONResponse(grid.query(q), headers=headers())

    def image(request: Request) -> Response:
        p = request.path_params
        data = grid.thumbnail(p["model"], p["id"], p["sample"])
        if data is None:
            return PlainTextResponse("404: no such image in this run", status_code=404)
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(data, media_type="image/png",
                        headers=headers({"Cache-Control": "private, max-age=86400, immutable", "ETag": etag}))

    async def checked(request: Request) -> dict[str, Any] | Response:
        """The JSON body of a state-changing request, or the 403 / 400 that refuses it."""
        if not hmac.compare_digest(request.headers.get("x-csrf-token", "").encode(), csrf.encode()):
            return PlainTextResponse("403: missing or wrong X-CSRF-Token", status_code=403)
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
            return PlainTextResponse(f"403: origin {origin!r} is not this server", status_code=403)
        if not request.headers.get("content-type", "").startswith("application/json"):
            return PlainTextResponse("415: a JSON body is required", status_code=415)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return PlainTextResponse("400: the body is not JSON", status_code=400)
        return body if isinstance(body, dict) else PlainTextResponse("400: the body must be an object", status_code=400)

    async def decide(request: Request) -> Response:
        body = await checked(request)
        if isinstance(body, Response):
            return body
        try:
            keys = grid.keys(list(body.get("items") or []))
            reason = body.get("reason")
            if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
                raise ValueError("reason: a string of at most 500 characters")
            table = await run_in_threadpool(grid.log.decide, keys, str(body.get("decision")), reason, reviewer)
        except KeyError as e:
            return JSONResponse({"error": str(e.args[0])}, status_code=404, headers=headers())
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400, headers=headers())
        return JSONResponse({"written": len(table)}, headers=headers())

    async def bulk(request: Request) -> Response:
        """Approve the best N per product by a score, skipping near-duplicates, nsfw and images already rejected."""
        body = await checked(request)
        if isinstance(body, Response):
            return body
        try:
            n = int(body.get("n", 0))
            score = str(body.get("score") or (grid.scores[0] if grid.scores else "clip_score"))
            latest = await run_in_threadpool(grid.log.latest)
            rejected = latest.filter(pc.equal(latest["decision"], "reject"))
            keys = best_per_group(grid.table, n, score, grid.product, exclude=rejected)
            table = await run_in_threadpool(grid.log.decide, keys, "approve",
                                            f"best {n} per {grid.product or 'model'} by {score}", reviewer)
        except (ValueError, TypeError) as e:
            return JSONResponse({"error": str(e)}, status_code=400, headers=headers())
        return JSONResponse({"written": len(table)}, headers=headers())

    routes = [Route("/", page), Route("/static/{name}", static), Route("/api/meta", meta), Route("/api/items", items),
              Route("/img/{model}/{id}/{sample:int}", image), Route("/api/decide", decide, methods=["POST"]),
              Route("/api/bulk", bulk, methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(TokenGuard, token=token)])


def _escape(s: str) -> str:
    import html

    return html.escape(s, quote=True)
