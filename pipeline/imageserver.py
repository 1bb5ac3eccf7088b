"""A loopback HTTP server over an in-memory table of routes (the demo's and the tests' image host)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple


@dataclass
class Route:
    body: bytes
    content_type: str = "image/jpeg"
    status: int = 200
    headers: List[Tuple[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    routes: Dict[str, Route] = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        route = self.server.routes.get(self.path)  # type: ignore[attr-defined]
        if route is None:
            route = Route(b"not found", "text/plain", 404)
        self.send_response(route.status)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(route.body)))
        for name, value in route.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(route.body)

    def log_message(self, *args):  # keep test and demo output clean
        pass


class ImageServer:
    """Serves ``routes`` (path -> Route) on 127.0.0.1 from a background thread."""

    def __init__(self, routes: Optional[Dict[str, Route]] = None):
        self.routes: Dict[str, Route] = dict(routes or {})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.routes = self.routes  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def use_routes(self, table: Dict[str, Route]) -> None:
        """Serve from ``table`` from now on: any mapping whose get(path) gives a Route, such as
        one that counts, delays or makes its answers (tests, benchmarks)."""
        self.routes = table
        self._server.routes = table  # type: ignore[attr-defined]

    @property
    def host_port(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def url(self, path: str) -> str:
        return f"http://{self.host_port}{path}"

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
