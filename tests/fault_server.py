"""A fault-injecting HTTP server on loopback, for fetch tests and benchmarks.

One route per fault (see ``FaultHandler.do_GET``); per-key counters make
"fail once, then succeed" routes independent between tests.  Use the
``fault_server`` fixture, or ``FaultServer()`` as a context manager.
"""
from __future__ import annotations

import collections
import io
import os
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import pytest

# X-Robots-Tag header lists served by /robots/<variant> (one header per list item).
ROBOTS_VARIANTS: Dict[str, List[str]] = {
    "noai": ["noai"],
    "ua-noimageai": ["paircurate: noimageai"],
    "otherbot": ["otherbot: noai"],                      # not for us: allowed
    "multi": ["noarchive", "nofollow, noimageindex"],    # second header, comma list
    "none": ["none"],                                    # none = noindex, nofollow
    "all": ["all"],                                      # allowed
    "mixed": ["otherbot: noai, paircurate: noindex"],
    "unavailable": ["unavailable_after: 25 Jun 2010 15:00:00 PST"],  # allowed
}


def make_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A decompression bomb: a 1-bit PNG of a blank canvas, tiny on disk, huge decoded."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def make_image(fmt: str = "JPEG", size=(64, 48), seed: int = 0) -> bytes:
    """A small valid image, generated with Pillow."""
    from PIL import Image

    width, height = size
    image = Image.new("RGB", size)
    image.putdata([((x * 7 + seed) % 256, (y * 5 + seed) % 256, (x * y + seed) % 256)
                   for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


class FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- helpers -----------------------------------------------------------
    def _send(self, code: int, body: bytes = b"", content_type: Optional[str] = "image/jpeg",
              headers=(), length: Optional[int] = -1) -> None:
        self.send_response(code)
        if content_type:
            self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0)."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _wait(self, seconds: float) -> None:
        self.server.stopping.wait(seconds)

    def _first(self, key: str) -> bool:
        """True the first time this key is hit (per server)."""
        with self.server.lock:
            return self.server.hits[key] == 1

    # -- routes ------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: C901 - a route table
        parsed = urllib.parse.urlsplit(self.path)
        path, query = parsed.path, dict(urllib.parse.parse_qsl(parsed.query))
        srv = self.server
        with srv.lock:
            srv.hits[path] += 1
            srv.times[path].append(time.monotonic())
            srv.user_agents.append(self.headers.get("User-Agent", ""))
            srv.host_headers.append(self.headers.get("Host", ""))
        parts = path.strip("/").split("/")
        head = parts[0]
        jpeg, png = srv.jpeg, srv.png

        if path == "/image.jpg":
            self._send(200, jpeg)
        elif path == "/image.png":
            self._send(200, png, "image/png")
        elif path.startswith("/img/"):  # benchmark images: /img/<name> from srv.files
            data = srv.files.get(parts[1])
            self._send(200, data) if data is not None else self._send(404, b"", "text/plain")
        elif path == "/octet.jpg":
            self._send(200, jpeg, "application/octet-stream")
        elif path == "/mislabeled.jpg":   # a JPEG served as text/html: bytes win
            self._send(200, jpeg, "text/html")
        elif path == "/notype.png":
            self._send(200, png, None)
        elif path == "/corrupt.jpg":      # half a JPEG, served whole: fetched fine, undecodable
            self._send(200, jpeg[: len(jpeg) // 2])
        elif path == "/bomb.png":         # a few kB that decode to 400 million pixels
            self._send(200, srv.bomb, "image/png")
        elif head == "status":
            self._send(int(parts[1]), b"<html><body>error</body></html>", "text/html")
        elif head == "flaky":             # 500 once per key, then the image
            if self._first(path):
                self._send(500, b"oops", "text/plain")
            else:
                self._send(200, jpeg)
        elif head == "always503":
            self._send(503, b"busy", "text/plain")
        elif head == "ratelimit":         # 429 Retry-After: 1 once per key, then the image
            if self._first(path):
                self._send(429, b"slow down", "text/plain", headers=[("Retry-After", "1")])
            else:
                self._send(200, jpeg)
        elif head == "unavailable":       # 503 Retry-After: ?after= (default 1) once per key, then the image
            if self._first(path):
                self._send(503, b"busy", "text/plain", headers=[("Retry-After", query.get("after", "1"))])
            else:
                self._send(200, jpeg)
        elif head == "ratelimit-long":    # asks for an hour: we give up
            self._send(429, b"", "text/plain", headers=[("Retry-After", "3600")])
        elif head == "reset":
            self._reset()
        elif head == "reset-mid":         # headers and part of the body, then RST
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(jpeg)))
            self.end_headers()
            self.wfile.write(jpeg[:100])
            self.wfile.flush()
            time.sleep(0.05)
            self._reset()
        elif head == "stall":             # headers, then nothing until long past any test timeout
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(jpeg)))
            self.end_headers()
            self.wfile.write(jpeg[:10])
            self.wfile.flush()
            self._wait(30)
            self.close_connection = True
        elif head == "stall-headers":     # accepts, reads the request, never answers
            self._wait(30)
            self.close_connection = True
        elif head == "trickle":           # a byte every 20 ms: each read is quick, the whole is not
            total = int(query.get("n", 5000))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(total))
            self.end_headers()
            body = (jpeg * (total // len(jpeg) + 1))[:total]
            try:
                for i in range(total):
                    if srv.stopping.is_set():
                        break
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                pass
            self.close_connection = True
        elif head == "big":               # /big?n=BYTES&mode=length|chunked|close
            total, mode = int(query.get("n", 1_000_000)), query.get("mode", "length")
            body = jpeg + b"\0" * max(0, total - len(jpeg))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if mode == "length":
                self.send_header("Content-Length", str(total))
            elif mode == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for i in range(0, total, 65536):
                    piece = body[i:i + 65536]
                    if mode == "chunked":
                        piece = b"%x\r\n%s\r\n" % (len(piece), piece)
                    self.wfile.write(piece)
                if mode == "chunked":
                    self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        elif head == "lying":             # claims more than it sends, then closes
            self._send(200, jpeg[:100], length=10_000)
        elif head == "html":
            self._send(200, b"<!DOCTYPE html><html><head><title>Not here</title></head>"
                            b"<body>" + b"x" * 5000 + b"</body></html>", "text/html; charset=utf-8")
        elif head == "html-as-image":     # an error page that claims to be a JPEG
            self._send(200, b"\n<html><body>404 not found</body></html>", "image/jpeg")
        elif head == "json":
            self._send(200, b'{"error": "nope"}', "application/json")
        elif head == "empty":
            self._send(200, b"", "image/jpeg")
        elif head == "redirect":          # /redirect/N -> /redirect/N-1 ... /redirect/0 is the image
            hops = int(parts[1])
            if hops == 0:
                self._send(200, jpeg)
            else:
                self._send(302, b"", None, headers=[("Location", f"/redirect/{hops - 1}")])
        elif head == "slow-redirect":     # /slow-redirect/N?s=S: waits S, then 302 to N-1; 0 is the image
            hops = int(parts[1])
            self._wait(float(query.get("s", 0.2)))
            if hops == 0:
                self._send(200, jpeg)
            else:
                self._send(302, b"", None, headers=[
                    ("Location", f"/slow-redirect/{hops - 1}?{parsed.query}")])
        elif head == "loop":              # /loop/a <-> /loop/b
            other = "b" if parts[1] == "a" else "a"
            self._send(301, b"", None, headers=[("Location", f"/loop/{other}")])
        elif head == "redirect-to":       # 302 to any URL (?to=)
            self._send(302, b"", None, headers=[("Location", query["to"])])
        elif head == "robots":
            self._send(200, jpeg, headers=[("X-Robots-Tag", v) for v in ROBOTS_VARIANTS[parts[1]]])
        elif head == "slow":              # /slow?s=SECONDS: waits, then the image; counts concurrency
            with srv.lock:
                srv.active += 1
                srv.max_active = max(srv.max_active, srv.active)
            try:
                self._wait(float(query.get("s", 0.2)))
            finally:
                with srv.lock:
                    srv.active -= 1
            self._send(200, jpeg)
        else:
            self._send(404, b"no such route", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:  # faults are deliberate
        pass


class FaultServer:
    """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) serving FaultHandler routes."""

    def __init__(self, files: Optional[Dict[str, bytes]] = None,
                 tls: Optional[Tuple[str, str]] = None):
        """``tls``: (certfile, keyfile) to serve https instead of http."""
        self._server = _Server(("127.0.0.1", 0), FaultHandler)
        srv = self._server
        self.scheme = "http"
        if tls is not None:
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            srv.socket = context.wrap_socket(srv.socket, server_side=True)
            self.scheme = "https"
        srv.lock = threading.Lock()
        srv.hits = collections.Counter()
        srv.times = collections.defaultdict(list)  # path -> server clock (monotonic) of each request
        srv.user_agents = []
        srv.host_headers = []
        srv.stopping = threading.Event()
        srv.active = 0
        srv.max_active = 0
        srv.jpeg = make_image("JPEG")
        srv.png = make_image("PNG", seed=3)
        srv.bomb = make_bomb()
        srv.files = files or {}
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> int:
        with self._server.lock:
            return self._server.hits[path]

    def times(self, path: str) -> List[float]:
        """When each request for ``path`` arrived (time.monotonic() on the server's side)."""
        with self._server.lock:
            return list(self._server.times[path])

    @property
    def state(self) -> _Server:
        return self._server

    def start(self) -> "FaultServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def fault_server():
    with FaultServer() as server:
        yield server


def self_signed_cert(folder: str, ip: str = "127.0.0.1") -> Tuple[str, str]:
    """(certfile, keyfile): a self-signed certificate for ``ip``, made with the openssl CLI."""
    import subprocess

    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", f"/CN={ip}", "-addext", f"subjectAltName=IP:{ip}"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":  # serve for manual poking: python tests/fault_server.py
    with FaultServer() as server:
        print("serving on", server.url("/"), "pid", os.getpid())
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
