"""``/metrics`` in Prometheus's text format, fed by the server's request observers (``serve/hooks.py``).

``ServeMetrics`` is a ``RequestObserver`` with a registry of its own (two apps in one process, as in
tests, never add to each other's counts), and ``with_metrics`` puts its ``/metrics`` route in front
of any app. Families (with the default namespace ``apportion``):

- ``apportion_requests_total{route, algorithm, status, outcome}``: every request to the completion
  routes, refused ones included (``algorithm="plain"`` for a plain backend call admitted to run,
  ``""`` for a request refused before it named an algorithm or was admitted as a plain call);
- ``apportion_request_duration_seconds{algorithm, outcome}``: a histogram of each request's time in
  the server, from arrival until its run was stopped and its spend settled;
- ``apportion_input_tokens_total``, ``apportion_output_tokens_total``, ``apportion_spent_usd_total``,
  ``apportion_generations_total`` ``{algorithm[, key]}``: what runs spent, scorers' and judges' calls
  included (the figures of the responses' ``usage`` and ``apportion.spent``); labelled by the key's
  id (never its secret) when ``MetricsOptions.by_key``;
- ``apportion_runs_in_flight{algorithm}``: requests admitted to run and not finished yet;
- the process's CPU, memory and file descriptors (``process_*``) where ``MetricsOptions.process``.

Observers are called inline on the event loop: each event costs a few label lookups and additions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import ProcessCollector as _ProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from apportion.errors import ConfigError
from apportion.serve.hooks import RequestFinished, RequestStarted

PLAIN = "plain"
"""The ``algorithm`` label of a request that runs no algorithm (one metered backend call)."""

DEFAULT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                           600.0)
"""Seconds. Wider than Prometheus's default (up to 10 s): a search under a large budget runs for minutes."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Every name here is a classic Prometheus name, so text format 1.0.0 (prometheus_client's latest)
would be the same bytes; 0.0.4 is what every Prometheus and scraper reads."""

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class MetricsOptions:
    namespace: str = "apportion"
    """The prefix of every family's name."""
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    by_key: bool = False
    """Label spend by the key's id (``apportion serve --keys`` turns it on). One series per key and
    algorithm: fine for the tens of keys a server has, not for one key per end user."""
    process: bool = True
    """Also export the process's CPU time, memory and open file descriptors (Linux's /proc)."""
    path: str = "/metrics"

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.namespace):
            raise ConfigError(f"a metrics namespace must be letters, digits and '_' (not first a digit), "
                              f"got {self.namespace!r}")
        buckets = self.latency_buckets
        if not buckets or any(not b > 0 for b in buckets) or any(a >= b for a, b in pairwise(buckets)):
            raise ConfigError(f"latency buckets must be increasing seconds > 0, got {buckets!r}")
        if not self.path.startswith("/") or self.path == "/":
            raise ConfigError(f"the metrics path must start with '/' and name something, got {self.path!r}")


class ServeMetrics:
    """A ``RequestObserver`` counting requests, spend and latency; ``render()`` is the exposition."""

    def __init__(self, options: MetricsOptions | None = None) -> None:
        self.options = o = options or MetricsOptions()
        self.registry = CollectorRegistry(auto_describe=True)
        spend_labels: Sequence[str] = ("algorithm", "key") if o.by_key else ("algorithm",)
        ns, reg = o.namespace, self.registry
        self._requests = Counter("requests", "Requests to the completion routes, by how they ended.",
                                 ("route", "algorithm", "status", "outcome"), namespace=ns, registry=reg)
        self._latency = Histogram("request_duration_seconds", "Time from a request's arrival until its run "
                                  "stopped and its spend was settled.", ("algorithm", "outcome"), namespace=ns,
                                  registry=reg, buckets=o.latency_buckets)
        self._input = Counter("input_tokens", "Input tokens spent by runs (every call's, scorers' included).",
                              spend_labels, namespace=ns, registry=reg)
        self._output = Counter("output_tokens", "Output tokens spent by runs (every call's, scorers' included).",
                               spend_labels, namespace=ns, registry=reg)
        self._usd = Counter("spent_usd", "Dollars spent by runs, at the backend's price.", spend_labels,
                            namespace=ns, registry=reg)
        self._generations = Counter("generations", "Generations (finished samples) drawn by runs.", spend_labels,
                                    namespace=ns, registry=reg)
        self._in_flight = Gauge("runs_in_flight", "Requests admitted to run and not finished yet.", ("algorithm",),
                                namespace=ns, registry=reg)
        if o.process:
            _ProcessCollector(registry=reg)
        self._running: dict[str, str] = {}
        """The algorithm label of each request started and not yet finished, by request id."""

    # -- RequestObserver ----------------------------------------------------------------------------

    def request_started(self, event: RequestStarted) -> None:
        algorithm = event.algorithm or PLAIN
        self._running[event.request_id] = algorithm
        self._in_flight.labels(algorithm).inc()

    def request_finished(self, event: RequestFinished) -> None:
        started = self._running.pop(event.request_id, None)
        if started is not None:
            self._in_flight.labels(started).dec()
        # None is both a plain call and a request refused before it named an algorithm: only an admitted
        # one is known to be plain.
        algorithm = event.algorithm or (PLAIN if started is not None else "")
        self._requests.labels(event.route, algorithm, str(event.status), event.outcome).inc()
        self._latency.labels(algorithm, event.outcome).observe(event.latency_s)
        spent = event.spent
        if not (spent.input_tokens or spent.output_tokens or spent.usd or spent.generations):
            return  # no series for requests that spent nothing (a 401 would make one per missing key)
        labels = (algorithm, event.key_id or "") if self.options.by_key else (algorithm,)
        self._input.labels(*labels).inc(spent.input_tokens)
        self._output.labels(*labels).inc(spent.output_tokens)
        self._usd.labels(*labels).inc(float(spent.usd))
        self._generations.labels(*labels).inc(spent.generations)

    # -- exposition ---------------------------------------------------------------------------------

    def render(self) -> bytes:
        """Every family in Prometheus's text format (version 0.0.4)."""
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE)

    def route(self) -> Route:
        return Route(self.options.path, self.endpoint, methods=["GET"])


def with_metrics(app: ASGIApp, metrics: ServeMetrics) -> Starlette:
    """``app`` with ``metrics``'s route in front of it (every other path goes to ``app`` unchanged).

    ``/metrics`` needs no API key, as ``/health``: it shows key ids and totals, never a secret or a
    prompt. Where those must stay private, serve on a private interface or filter the path at the proxy."""
    return Starlette(routes=[metrics.route(), Mount("", app=app)])
