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

``RequestLog`` is the ``RequestObserver`` behind the first two: a ring buffer of finished requests,
the requests in flight, and one tally per key and per algorithm, all bounded (keys are the store's,
algorithms the registry's; error texts are cut short).

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
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from apportion.errors import ConfigError
from apportion.serve._requests import RequestError
from apportion.serve.hooks import OUTCOMES, RequestFinished, RequestStarted
from apportion.serve.openai_app import error_object

if TYPE_CHECKING:
    from apportion.bench.report import Curve, Summary

log = logging.getLogger(__name__)

COOKIE = "apportion_dashboard"
"""The cookie holding the dashboard token once ``/?token=...`` was opened."""

_ERROR_CHARS = 300
"""Error texts kept per request: they may quote a client's input, which can be a megabyte."""

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


# -- the request log (the observer) ------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """Requests and what they spent, for one key, one algorithm, or all."""

    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    generations: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: Fraction = Fraction(0)
    latency_s: float = 0.0

    def add(self, event: RequestFinished) -> None:
        self.requests += 1
        self.outcomes[event.outcome] = self.outcomes.get(event.outcome, 0) + 1
        self.generations += event.spent.generations
        self.input_tokens += event.spent.input_tokens
        self.output_tokens += event.spent.output_tokens
        self.usd += event.spent.usd
        self.latency_s += event.latency_s

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, **self.outcomes, "generations": self.generations,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens, "usd": float(self.usd),
                "mean_latency_s": round(self.latency_s / self.requests, 6) if self.requests else None}


@dataclass(frozen=True, slots=True)
class _Live:
    event: RequestStarted
    at: float
    """Wall-clock time it started (for the page); ``since`` the monotonic one (for its age)."""
    since: float


@dataclass(frozen=True, slots=True)
class _Done:
    event: RequestFinished
    at: float


class RequestLog:
    """A ``RequestObserver`` keeping what the dashboard shows, in bounded memory: the requests in
    flight, the last ``recent`` finished ones, and a tally per key and per algorithm.

    Observers are called on the server's event loop, but a snapshot may be taken from any thread
    (an app embedding the server, a test), so a lock guards the state: each call holds it for
    microseconds."""

    def __init__(self, recent: int = 100, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if recent < 1:
            raise ConfigError(f"the request log keeps at least 1 finished request, not {recent}")
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._in_flight: dict[str, _Live] = {}
        self._recent: deque[_Done] = deque(maxlen=recent)
        self._finished = 0
        self._total = Tally()
        self._by_key: dict[str | None, Tally] = {}
        self._by_algorithm: dict[str | None, Tally] = {}
        self._since = clock()

    @property
    def capacity(self) -> int:
        return self._recent.maxlen or 0

    def request_started(self, event: RequestStarted) -> None:
        with self._lock:
            self._in_flight[event.request_id] = _Live(event, self._clock(), self._monotonic())

    def request_finished(self, event: RequestFinished) -> None:
        if event.error is not None and len(event.error) > _ERROR_CHARS:
            event = _shortened(event)
        with self._lock:
            self._in_flight.pop(event.request_id, None)
            self._recent.append(_Done(event, self._clock()))
            self._finished += 1
            self._total.add(event)
            self._by_key.setdefault(event.key_id, Tally()).add(event)
            self._by_algorithm.setdefault(event.algorithm, Tally()).add(event)

    def requests(self) -> dict[str, Any]:
        """``/dashboard/api/requests``: in flight (oldest first), then the recent finished (newest first)."""
        with self._lock:
            now = self._monotonic()
            live = sorted(self._in_flight.values(), key=lambda x: x.since)
            in_flight = [{**_identity(x.event), "budget": x.event.budget.limits(), "started_at": _iso(x.at),
                          "elapsed_s": round(now - x.since, 3)} for x in live]
            recent = [_finished(x) for x in reversed(self._recent)]
            return {"in_flight": in_flight, "recent": recent, "capacity": self.capacity,
                    "finished_total": self._finished}

    def spend(self) -> dict[str, Any]:
        """``/dashboard/api/spend``: the tallies since the server started, dearest first."""
        with self._lock:
            return {"since": _iso(self._since), "total": self._total.to_dict(),
                    "by_key": [{"key_id": k, **t.to_dict()} for k, t in _dearest(self._by_key)],
                    "by_algorithm": [{"algorithm": a, **t.to_dict()} for a, t in _dearest(self._by_algorithm)]}


def _shortened(event: RequestFinished) -> RequestFinished:
    assert event.error is not None
    return RequestFinished(event.request_id, event.route, event.algorithm, event.key_id, event.stream, event.status,
                           event.outcome, event.latency_s, event.spent, event.budget,
                           event.error[:_ERROR_CHARS] + "…")


def _identity(event: RequestStarted | RequestFinished) -> dict[str, Any]:
    return {"request_id": event.request_id, "route": event.route, "algorithm": event.algorithm,
            "key_id": event.key_id, "stream": event.stream}


def _finished(done: _Done) -> dict[str, Any]:
    e = done.event
    spent = e.spent
    return {**_identity(e), "status": e.status, "outcome": e.outcome, "latency_s": round(e.latency_s, 6),
            "finished_at": _iso(done.at), "budget": e.budget.limits() if e.budget is not None else None,
            "spent": {"generations": spent.generations, "input_tokens": spent.input_tokens,
                      "output_tokens": spent.output_tokens, "total_tokens": spent.total_tokens,
                      "usd": float(spent.usd)},
            "error": e.error}


def _dearest(tallies: dict[str | None, Tally]) -> list[tuple[str | None, Tally]]:
    return sorted(tallies.items(), key=lambda kv: (-kv[1].usd, -(kv[1].input_tokens + kv[1].output_tokens),
                                                   -kv[1].requests, kv[0] or ""))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- benchmark runs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Run:
    stamp: tuple[int, int]
    """(mtime in ns, size) of the summary it was read from: a run rewritten since is read again."""
    summary: Summary
    curves: list[Curve]
    plot: bytes | None = None


class RunPlots:
    """Benchmark runs read with the report's own loading (``bench.report.load_summary``, ``build_curves``)
    and drawn with its plots: accuracy against mean tokens per question, or against generations where
    the rows have no token counts. Each is read at start-up (a bad directory is a ``ConfigError`` then),
    and again when its ``summary.json`` changes (a run still being written); a run that became
    unreadable shows its error instead of its curves."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = tuple(_summary_path(Path(p)) for p in paths)
        self._runs: dict[int, _Run] = {}
        # held in worker threads around reading and drawing: two requests must not draw one plot
        # twice, and matplotlib's rc_context changes process-wide settings while it draws
        self._lock = threading.Lock()
        for index in range(len(self._paths)):
            self._read(index)

    def __len__(self) -> int:
        return len(self._paths)

    async def describe(self) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(self._describe)

    async def plot(self, index: int) -> bytes:
        """The run's plot as PNG; ``IndexError`` for no such run, ``ConfigError`` for one unreadable now."""
        return await anyio.to_thread.run_sync(self._plot, index)

    def _describe(self) -> list[dict[str, Any]]:
        out = []
        for index, path in enumerate(self._paths):
            entry: dict[str, Any] = {"index": index, "path": str(path.parent if path.name == "summary.json" else path)}
            try:
                with self._lock:
                    run = self._read(index)
            except (ConfigError, OSError) as exc:
                out.append({**entry, "error": str(exc), "curves": [], "plot": None})
                continue
            s = run.summary
            tokens = _has_tokens(s)
            out.append({**entry, "run": s.run, "dataset": s.dataset, "model": s.model, "backend": s.backend,
                        "questions": s.questions, "created": s.created, "error": None,
                        "x_axis": "tokens" if tokens else "generations",
                        "plot": f"dashboard/runs/{index}/plot.png?v={run.stamp[0]}-{run.stamp[1]}",
                        "curves": [_curve(c) for c in run.curves]})
        return out

    def _plot(self, index: int) -> bytes:
        if not 0 <= index < len(self._paths):
            raise IndexError(index)
        with self._lock:
            run = self._read(index)
            if run.plot is None:
                run = _Run(run.stamp, run.summary, run.curves, _draw(run.summary, run.curves))
                self._runs[index] = run
            assert run.plot is not None
            return run.plot

    def _read(self, index: int) -> _Run:
        """The run, read again if its summary changed (the caller holds the lock, or is the constructor)."""
        from apportion.bench.report import build_curves, load_summary  # matplotlib: only for servers with runs

        path = self._paths[index]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(f"no summary.json at {path}: give a directory `apportion bench` wrote") from None
        except OSError as exc:
            raise ConfigError(f"benchmark run {path}: {exc.strerror or exc}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._runs.get(index)
        if cached is not None and cached.stamp == stamp:
            return cached
        summary = load_summary(path)
        run = self._runs[index] = _Run(stamp, summary, build_curves(summary.rows))
        return run


def _summary_path(path: Path) -> Path:
    return path / "summary.json" if path.is_dir() else path


def _has_tokens(summary: Summary) -> bool:
    return any(r.tokens is not None and r.tokens > 0 for r in summary.rows)


def _curve(curve: Curve) -> dict[str, Any]:
    return {"label": curve.label, "color": curve.color, "peer": curve.peer,
            "points": [{"budget": r.budget, "accuracy": r.accuracy, "ci_low": r.ci_low, "ci_high": r.ci_high,
                        "generations": r.mean_generations, "tokens": r.tokens, "usd": r.usd} for r in curve.rows]}


def _draw(summary: Summary, curves: list[Curve]) -> bytes:
    import matplotlib

    from apportion.bench.report import STYLE, plot_accuracy_vs_budget, plot_accuracy_vs_tokens

    draw = plot_accuracy_vs_tokens if _has_tokens(summary) else plot_accuracy_vs_budget
    # the report's plots write files; a private directory keeps concurrent servers apart
    with tempfile.TemporaryDirectory(prefix="apportion-dashboard-") as tmp, matplotlib.rc_context(STYLE):
        return draw(summary, curves, Path(tmp) / "plot.png").read_bytes()


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
