"""The hub's read-only status port: the status page (/), its data (/status.json) and
Prometheus metrics (/metrics), served by the standard library's ThreadingHTTPServer on a
daemon thread. It only calls the hub's status function; the round loop knows nothing of it.

Bound to 127.0.0.1 by default: the page names devices and shows rejection reasons, so
exposing it (--status-host 0.0.0.0) is the operator's choice, best behind a reverse proxy.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fedge.models.errors import ConfigError

from .metrics import metrics_registry

log = logging.getLogger("fedge.hub.status")
PAGE_FILE = "status_page.html"  # package data of fedge.hub; no build step, no CDN (works offline)
INITIAL_MARK = "/*INITIAL_STATUS*/null"  # the page's first snapshot goes here, so it renders before any fetch


def finite(value: Any) -> Any:
    """The value with NaN and infinities as None, so the JSON is valid for a browser's JSON.parse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def status_json(status: dict[str, Any]) -> str:
    return json.dumps(finite(status), separators=(",", ":"))


def render_page(status: dict[str, Any]) -> str:
    """The page with the current snapshot inlined (`<` escaped: device ids and reasons are text
    from devices and must not close the script element)."""
    page = files("fedge.hub").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    return page.replace(INITIAL_MARK, status_json(status).replace("<", "\\u003c"))


class StatusServer:
    """Serves one hub's status; start() returns at once, stop() (idempotent) frees the port."""

    def __init__(self, status: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0) -> None:
        self.status = status
        self.registry = metrics_registry(status)
        try:
            self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:
            raise ConfigError(_bind_error(host, port, exc)) from None
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"

    def start(self) -> StatusServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fedge-status", daemon=True)
        self._thread.start()
        log.info("status page on %s (metrics: %smetrics)", self.url, self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"status port {port} on {host} is already in use (another hub or program?); choose another --status-port"
    if exc.errno == errno.EACCES:
        return f"status port {port} on {host}: permission denied (ports below 1024 need root); use a port above 1023"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"status host {host} is not an address of this machine (--status-host)"
    return f"cannot serve the status page on {host}:{port}: {exc.strerror or exc}"


def _handler(server: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """GET (and HEAD) only: anything else gets 501 from the base class. Read-only by design."""

        server_version = "fedge-status"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._respond(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond(head=True)

        def _respond(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path in ("/", "/index.html"):
                    body, ctype = render_page(server.status()).encode(), "text/html; charset=utf-8"
                elif path == "/status.json":
                    body, ctype = status_json(server.status()).encode(), "application/json"
                elif path == "/metrics":
                    body, ctype = generate_latest(server.registry), CONTENT_TYPE_LATEST
                else:
                    self.send_error(HTTPStatus.NOT_FOUND, "the status port serves /, /status.json and /metrics")
                    return
            except Exception as exc:  # noqa: BLE001 - a monitoring request never takes the hub down
                log.exception("status request %s failed", path)
                self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
