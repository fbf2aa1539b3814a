"""The dashboard of ``apportion serve``: a page at ``/`` showing the requests in flight and the last
finished ones, spend per key and per algorithm since the server started, and accuracy-versus-spend
plots of benchmark runs (``apportion serve --runs DIR``).

The page is static HTML, CSS and plain JavaScript (``serve/static/``: no CDN, nothing fetched from
elsewhere) polling three JSON endpoints:

- ``GET /dashboard/api/requests``: ``in_flight`` (oldest first) and ``recent`` (the last
  ``DashboardOptions.recent`` finished requests, newest first);
- ``GET /dashboard/api/spend``: ``total``, ``by_key`` and ``by_algorithm`` since the server started;
- ``GET /dashboard/api/runs``: each run's metadata and curves, and the URL of its plot
  (``GET /dashboard/runs/{index}/plot.png``, drawn by the report's own plotting on first use and
  cached until its ``summary.json`` changes).

The parts: ``dashboard_log`` (``RequestLog``, the ``RequestObserver`` behind the first two) and
``dashboard_runs`` (``RunPlots``, the third and its plots); here the options, the routes and who may
look.

Who may look (``Dashboard.routes``): with ``DashboardOptions.token`` set, only a client holding it,
as the ``Authorization: Bearer`` header or the cookie that ``/?token=...`` sets (an HttpOnly,
SameSite=Strict cookie; the page then redirects to ``/`` so the token leaves the address bar).
Without a token, a server that requires API keys shows its dashboard to loopback clients only (the
operator on the machine), and an open server to anyone (its API is open anyway). Nothing shown is a
secret: keys appear by their stored id.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from apportion.errors import ConfigError
from apportion.serve._requests import RequestError
from apportion.serve.dashboard_log import RequestLog, Tally
from apportion.serve.dashboard_runs import RunPlots
from apportion.serve.openai_app import error_object

__all__ = ["COOKIE", "Dashboard", "DashboardOptions", "RequestLog", "RunPlots", "Tally", "with_dashboard"]

log = logging.getLogger(__name__)

COOKIE = "apportion_dashboard"
"""The cookie holding the dashboard token once ``/?token=...`` was opened."""

_ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}

_CHALLENGE = {"WWW-Authenticate": "Bearer"}

_SECURITY_HEADERS = {
    # the page loads only its own script, style and plots; nothing inline, nothing from elsewhere
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class DashboardOptions:
    """What the dashboard shows and who may see it."""

    recent: int = 100
    """Finished requests kept and shown (a ring buffer: older ones are dropped)."""
    runs: tuple[Path, ...] = ()
    """Benchmark run directories (or their ``summary.json``) whose accuracy-versus-spend plots are shown."""
    token: str | None = None
    """The admin credential the page and its API need (None: loopback only where API keys are required,
    anyone on an open server)."""
    refresh_s: float = 2.0
    """How often the page polls for requests and spend."""

    def __post_init__(self) -> None:
        if not 1 <= self.recent <= 100_000:
            raise ConfigError(f"the dashboard keeps between 1 and 100000 recent requests, not {self.recent}")
        if not 0.1 <= self.refresh_s <= 3600:
            raise ConfigError(f"the dashboard's refresh must be between 0.1 and 3600 seconds, not {self.refresh_s}")
        if self.token is not None and (not self.token or self.token != self.token.strip() or len(self.token) < 8):
            raise ConfigError("the dashboard token must be at least 8 characters, without surrounding spaces")


# -- the routes ----------------------------------------------------------------------------------------


class Dashboard:
    """The dashboard: ``log`` is its request observer (pass it among the app's observers), ``routes``
    its page and endpoints (``with_dashboard`` mounts them in front of an app)."""

    def __init__(self, options: DashboardOptions | None = None) -> None:
        self.options = options or DashboardOptions()
        self.log = RequestLog(self.options.recent)
        self.runs = RunPlots(self.options.runs)
        static = resources.files("apportion.serve") / "static"
        self._page = (static / "dashboard.html").read_text(encoding="utf-8").replace(
            "__REFRESH_MS__", str(round(self.options.refresh_s * 1000)))
        self._assets = {name: (static / name).read_bytes() for name in _ASSETS}

    def routes(self, *, keys: bool) -> list[Route]:
        """The page and its endpoints. ``keys``: the server requires API keys, so that without a token
        only loopback clients may look."""
        guard = _Guard(self.options.token, keys)
        return [
            Route("/", guard.page(self._index), methods=["GET"]),
            Route("/dashboard/static/{name}", guard.api(self._asset), methods=["GET"]),
            Route("/dashboard/api/requests", guard.api(self._requests), methods=["GET"]),
            Route("/dashboard/api/spend", guard.api(self._spend), methods=["GET"]),
            Route("/dashboard/api/runs", guard.api(self._runs), methods=["GET"]),
            Route("/dashboard/runs/{index:int}/plot.png", guard.api(self._plot), methods=["GET"]),
        ]

    async def _index(self, request: Request) -> Response:
        return HTMLResponse(self._page, headers=_SECURITY_HEADERS)

    async def _asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _ASSETS:
            raise RequestError(f"no dashboard asset {name!r}", status=404, code="not_found")
        return Response(self._assets[name], media_type=_ASSETS[name], headers=_SECURITY_HEADERS)

    async def _requests(self, request: Request) -> Response:
        return JSONResponse({**self.log.requests(), "refresh_s": self.options.refresh_s}, headers=_SECURITY_HEADERS)

    async def _spend(self, request: Request) -> Response:
        return JSONResponse(self.log.spend(), headers=_SECURITY_HEADERS)

    async def _runs(self, request: Request) -> Response:
        return JSONResponse({"runs": await self.runs.describe()}, headers=_SECURITY_HEADERS)

    async def _plot(self, request: Request) -> Response:
        index = request.path_params["index"]
        try:
            png = await self.runs.plot(index)
        except IndexError:
            raise RequestError(f"no benchmark run {index}: this server shows {len(self.runs)}", status=404,
                               code="not_found", param="index") from None
        except ConfigError as exc:
            raise RequestError(f"benchmark run {index} cannot be drawn now: {exc}", status=404,
                               code="run_unreadable", param="index") from None
        return Response(png, media_type="image/png", headers=_SECURITY_HEADERS)


def with_dashboard(app: ASGIApp, dashboard: Dashboard, *, keys: bool) -> Starlette:
    """``app`` with ``dashboard``'s page and endpoints in front of it (every other path goes to ``app``
    unchanged). ``dashboard.log`` must be among ``app``'s observers for the page to see requests:
    ``algorithm_app(..., observers=[dashboard.log])``. ``keys``: the app requires API keys (see
    ``Dashboard.routes``)."""
    return Starlette(routes=[*dashboard.routes(keys=keys), Mount("", app=app)])


Handler = Callable[[Request], Any]


class _Guard:
    """Who may see the dashboard (see the module's docstring)."""

    def __init__(self, token: str | None, keys: bool) -> None:
        self.token = token
        self.keys = keys

    def refusal(self, request: Request) -> RequestError | None:
        if self.token is not None:
            given = request.cookies.get(COOKIE) or _bearer(request)
            if not given:
                return RequestError("the dashboard needs its token: open /?token=<the --dashboard-token> once, or "
                                    "send Authorization: Bearer <token>", status=401, code="dashboard_token_required",
                                    headers=_CHALLENGE)
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return RequestError("wrong dashboard token", status=401, code="invalid_dashboard_token",
                                    headers=_CHALLENGE)
            return None
        if self.keys and not _loopback(request):
            return RequestError("this server requires API keys, so its dashboard answers only on the loopback "
                                "interface unless the server is started with --dashboard-token", status=403,
                                code="dashboard_loopback_only")
        return None

    def api(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            refused = self.refusal(request)
            if refused is not None:
                return _json_error(refused)
            try:
                response: Response = await handler(request)
            except RequestError as err:
                return _json_error(err)
            return response

        return guarded

    def page(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            offered = request.query_params.get("token")
            if offered is not None and self.token is not None:
                if not hmac.compare_digest(offered.encode(), self.token.encode()):
                    return _html_refusal(RequestError("wrong dashboard token", status=401,
                                                      code="invalid_dashboard_token"))
                # the cookie carries the token from now on; the redirect takes it out of the address bar
                redirect = RedirectResponse(request.url.path, status_code=303, headers=_SECURITY_HEADERS)
                redirect.set_cookie(COOKIE, self.token, httponly=True, samesite="strict",
                                    path=(request.scope.get("root_path") or "") + "/")
                return redirect
            refused = self.refusal(request)
            if refused is not None:
                return _html_refusal(refused)
            response: Response = await handler(request)
            return response

        return guarded


def _bearer(request: Request) -> str | None:
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    return secret.strip() if scheme.lower() == "bearer" and secret.strip() else None


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client is not None else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _json_error(err: RequestError) -> JSONResponse:
    return JSONResponse(error_object(err), status_code=err.status, headers={**_SECURITY_HEADERS, **err.headers})


def _html_refusal(err: RequestError) -> HTMLResponse:
    body = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>apportion dashboard</title></head>'
            f"<body><h1>apportion dashboard</h1><p>{html.escape(err.message)}</p></body></html>\n")
    return HTMLResponse(body, status_code=err.status, headers={**_SECURITY_HEADERS, **err.headers})
