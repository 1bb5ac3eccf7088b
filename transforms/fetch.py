"""Fetch: download image bytes from untrusted URLs, safely and politely.

Pure functions first (URL host parsing, address classification, X-Robots-Tag,
backoff, content sniffing), then ``fetch_url`` (one URL -> ``FetchResult``),
``apply_fetch`` (result -> record), and the Beam wrapper ``FetchImages``.

Safety model: the address check applies to the address actually connected to.
We resolve a host once ourselves, check every address, then connect a socket
to that exact checked address (TLS verifies the certificate against the host
name), so DNS rebinding between check and connect is impossible.  Every
redirect hop goes through the same path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import ipaddress
import random
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import apache_beam as beam

from paircurate.transforms.beam_util import ConcurrentRecordFn
from paircurate.transforms.schema import Status, is_live, mark
from paircurate.transforms.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, setting


@dataclass
class FetchConfig:
    threads: int = setting(64, AT_LEAST_ONE)
    connect_timeout: float = setting(10.0, POSITIVE)
    # Limit for the whole response (headers and body), not per read.
    timeout: float = setting(30.0, POSITIVE)
    # Limit for everything one URL may take: every attempt, redirect hop, backoff and
    # Retry-After wait (None: 3 x timeout).  Past it the row is fetch_failed "timeout: deadline".
    url_deadline: Optional[float] = setting(None, POSITIVE)
    retries: int = setting(2, NON_NEGATIVE)
    backoff_base: float = setting(0.5, NON_NEGATIVE)
    backoff_max: float = setting(8.0, NON_NEGATIVE)
    retry_after_max: float = setting(30.0, NON_NEGATIVE)
    # Retry timeouts too?  Off: a retried timeout costs another whole timeout.
    retry_timeouts: bool = False
    max_bytes: int = setting(20 * 1024 * 1024, AT_LEAST_ONE)
    max_redirects: int = setting(5, NON_NEGATIVE)
    per_host_concurrency: int = setting(16, AT_LEAST_ONE)
    user_agent: str = "paircurate/0.1 (+https://github.com/paircurate/paircurate)"
    user_agent_token: str = "paircurate"
    # X-Robots-Tag directives that mark an image as opted out (img2dataset's defaults).
    disallowed_header_directives: List[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    # SSRF protection: refuse private, loopback, link-local, ... addresses.
    block_private_addresses: bool = True
    # host:port pairs exempt from the address check (tests and the demo serve on loopback).
    allowed_hosts: List[str] = field(default_factory=list)


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Resolver = Callable[..., Sequence[tuple]]

# Statuses (408 Request Timeout, 429 Too Many Requests, 5xx) worth retrying.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504, 507, 509, 520, 521, 522, 523, 524})
REDIRECT_HTTP = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_SNIFF_BYTES = 1024  # enough for every signature sniff_image knows


# --------------------------------------------------------------------------
# Errors


class FetchError(Exception):
    """A failure with its terminal status and short error string ("class: detail")."""

    def __init__(self, status: Status, error: str, transient: bool = False,
                 http_status: Optional[int] = None, retry_after: Optional[float] = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.transient = transient
        self.http_status = http_status
        self.retry_after = retry_after


def _failed(error: str, transient: bool = False, **kw) -> FetchError:
    return FetchError(Status.FETCH_FAILED, error, transient, **kw)


# --------------------------------------------------------------------------
# URL and host parsing


def parse_ipv4_number(host: str) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address of a numeric host in any inet_aton form, else None.

    Browsers and glibc accept ``2130706433``, ``0x7f.1``, ``017700000001``
    and ``127.1`` for 127.0.0.1 (WHATWG URL "IPv4 number" parsing); so do we,
    so that a check on the literal cannot be bypassed by its spelling.
    """
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()  # a trailing dot is allowed
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        if part[:2].lower() == "0x":
            digits, base = part[2:], 16
            if digits and not all(c in "0123456789abcdefABCDEF" for c in digits):
                return None
            numbers.append(int(digits, 16) if digits else 0)
            continue
        if not part or not part.isascii() or not part.isdigit():
            return None
        base = 8 if len(part) > 1 and part[0] == "0" else 10
        try:
            numbers.append(int(part, base))
        except ValueError:  # 8 or 9 in an octal part
            return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed http(s) URL: what to connect to and what to ask for."""

    scheme: str
    host: str                  # canonical: lower-case ASCII (IDNA), IPs normalised, no brackets
    port: int
    ip: Optional[IPAddress]    # set when the host is an address literal
    path: str                  # request target: path and query, percent-encoded

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if self.ip is not None and self.ip.version == 6 else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


# Characters left as they are in the request target (RFC 3986 reserved + unreserved + %).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~?"


def parse_target(url: str) -> Target:
    """Parse and canonicalise an http(s) URL; raise FetchError for bad or unsupported ones."""
    if not isinstance(url, str) or not url.strip():
        raise FetchError(Status.FETCH_FAILED, "invalid_url: empty")
    url = url.strip()
    if any(ord(c) < 0x20 or c == "\x7f" for c in url):
        raise FetchError(Status.FETCH_FAILED, "invalid_url: control character")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise FetchError(Status.FETCH_FAILED, f"invalid_url: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(Status.BLOCKED_ADDRESS, f"scheme: {scheme or 'none'}")
    try:
        port = parts.port
        raw_host = parts.hostname  # lower-cased, brackets removed
    except ValueError as exc:
        raise FetchError(Status.FETCH_FAILED, f"invalid_url: {exc}") from None
    if not raw_host:
        raise FetchError(Status.FETCH_FAILED, "invalid_url: no host")
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0:
        raise FetchError(Status.FETCH_FAILED, "invalid_url: port 0")
    ip: Optional[IPAddress] = None
    if ":" in raw_host:  # only IPv6 literals hold colons after urlsplit
        try:
            ip = ipaddress.IPv6Address(raw_host.replace("%25", "%", 1))  # RFC 6874 zone id
        except ValueError:
            raise FetchError(Status.FETCH_FAILED, f"invalid_url: bad IPv6 host {raw_host}") from None
        host = str(ip)
    else:
        ip = parse_ipv4_number(raw_host)
        if ip is not None:
            host = str(ip)
        else:
            try:
                host = raw_host.rstrip(".").encode("idna").decode("ascii").lower()
            except UnicodeError:
                raise FetchError(Status.FETCH_FAILED, "invalid_url: bad host name") from None
            if not host or any(c in host for c in " /\\%@[]"):
                raise FetchError(Status.FETCH_FAILED, "invalid_url: bad host name")
            # A last label of digits that is not a valid IPv4 number (e.g. 1.2.3.4.5, 999.1) is
            # an error in browsers; never pass it to the resolver, which may read it its own way.
            last = host.rsplit(".", 1)[-1]
            if last.isdigit() or last.lower().startswith("0x"):
                raise FetchError(Status.FETCH_FAILED, f"invalid_url: bad numeric host {raw_host}")
    path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe=_PATH_SAFE)
    return Target(scheme, host, port, ip, path)


def parse_host_port(entry: str) -> Tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` of allowed_hosts -> (canonical host, port)."""
    target = parse_target("http://" + entry.strip() + "/")
    return target.host, target.port


# --------------------------------------------------------------------------
# Address classification (SSRF)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPAT = ipaddress.IPv6Network("::/96")


def _blocked_v4(ip: ipaddress.IPv4Address) -> bool:
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified


def blocked_address(ip: IPAddress) -> Optional[str]:
    """The address to report if ``ip`` may not be contacted (non-global), else None.

    IPv6 forms that embed an IPv4 address (mapped ::ffff:a.b.c.d, NAT64
    64:ff9b::a.b.c.d, 6to4 2002:AABB:CCDD::) are judged by the embedded address.
    """
    if ip.version == 4:
        return str(ip) if _blocked_v4(ip) else None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped) if _blocked_v4(ip.ipv4_mapped) else None
    if ip in _NAT64:
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        return str(embedded) if _blocked_v4(embedded) else None
    if ip in _NAT64_LOCAL or ip in _IPV4_COMPAT:
        return str(ip)  # local-use NAT64; deprecated IPv4-compatible (incl. :: and ::1)
    if ip.sixtofour is not None and _blocked_v4(ip.sixtofour):
        return str(ip.sixtofour)
    if ip.teredo is not None:
        return str(ip)
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_site_local:
        return str(ip)
    return None


# --------------------------------------------------------------------------
# X-Robots-Tag

# Directives that carry a value after a colon, so "name:" is not a user-agent scope.
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
# Shorthands that imply other directives.
_IMPLIED = {"none": ("noindex", "nofollow")}


def robots_disallowed(values: Iterable[str], token: str, directives: Iterable[str]) -> Optional[str]:
    """The first disallowed directive in X-Robots-Tag header ``values`` that applies to us.

    A value is a comma list; ``"bot: d1, d2"`` scopes what follows to ``bot``
    (until the next scope), so "otherbot: noai" does not apply to us and
    "paircurate: noai" does.  ``none`` implies ``noindex``.
    """
    wanted = {d.strip().lower() for d in directives}
    token = token.strip().lower()
    for value in values:
        scope: Optional[str] = None
        for part in (value or "").split(","):
            part = part.strip().lower()
            if ":" in part:
                name, rest = (s.strip() for s in part.split(":", 1))
                if name not in _VALUED_DIRECTIVES:
                    scope, part = name, rest
            if not part or (scope is not None and scope != token):
                continue
            name = part.split(":", 1)[0].strip()
            if name in wanted:
                return name
            if any(implied in wanted for implied in _IMPLIED.get(name, ())):
                return name
    return None


# --------------------------------------------------------------------------
# Retry timing


def backoff_delay(attempt: int, base: float, maximum: float,
                  rng: Optional[random.Random] = None) -> float:
    """Delay before retry number ``attempt`` (0-based): exponential, capped, "equal jitter".

    Half the delay is fixed so retries never hammer, half random so that many
    workers failing together spread out.
    """
    ceiling = min(maximum, base * (2 ** attempt))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        seconds = float(value)  # not standard, but common ("1.5")
        return seconds if seconds >= 0 else None
    except ValueError:
        pass
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


# --------------------------------------------------------------------------
# Content checks

_MARKUP_PREFIXES = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<!--", b"<script",
                    b"<meta", b"<title", b"<div", b"<p", b"<a ", b"<table", b"<iframe", b"<h1",
                    b"<br", b"<b>", b"<link", b"<style")


def sniff_image(head: bytes) -> Optional[str]:
    """The image format the leading bytes announce (jpeg, png, ...), else None."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 14:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ico"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1",
                                                b"msf1", b"heim", b"heis", b"hevc"):
        return "avif" if head[8:11] == b"avi" else "heif"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "jxl"
    if head[:4] == b"\x00\x00\x00\x0c" and head[4:12] == b"jP  \r\n\x87\n":
        return "jp2"
    return None


def sniff_markup(head: bytes) -> bool:
    """True when the leading bytes look like HTML/XML (an error page, not an image)."""
    text = head[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(_MARKUP_PREFIXES) and b"<svg" not in head[:1024].lower()


def _media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def content_problem(head: bytes, content_type: Optional[str]) -> Optional[str]:
    """Why a body starting with ``head`` is not an image (error string), else None.

    Lenient: bytes that sniff as an image pass whatever the Content-Type says;
    unknown bytes pass when the type is image/* or says nothing useful (the
    decode stage then judges them).  Markup, and declared non-image types, fail.
    """
    if not head:
        return "empty"
    if sniff_image(head):
        return None
    media = _media_type(content_type)
    if sniff_markup(head):
        return f"not_image: {media or 'markup'}"
    if media.startswith("image/") or media in ("", "application/octet-stream",
                                               "binary/octet-stream", "application/unknown"):
        return None
    return f"not_image: {media}"


# --------------------------------------------------------------------------
# Per-host politeness


class HostLimiter:
    """Caps concurrent requests per host and holds back hosts that asked us to wait.

    One instance is shared by all threads of a worker process (see shared_host_limiter).
    """

    def __init__(self, per_host: int, clock: Callable[[], float] = time.monotonic):
        self.per_host = max(1, per_host)
        self._clock = clock
        self._cond = threading.Condition()
        self._active: Dict[str, int] = {}
        self._not_before: Dict[str, float] = {}

    def acquire(self, host: str, deadline: Optional[float] = None) -> bool:
        """Wait for a slot on ``host``; False if ``deadline`` (clock time) passes first."""
        with self._cond:
            while True:
                now = self._clock()
                wait_until = self._not_before.get(host, 0.0)
                if wait_until <= now and self._active.get(host, 0) < self.per_host:
                    self._active[host] = self._active.get(host, 0) + 1
                    self._not_before.pop(host, None)
                    return True
                if deadline is not None and now >= deadline:
                    return False
                timeout = max(wait_until - now, 0.0) or None
                if deadline is not None:
                    timeout = min(timeout or deadline - now, deadline - now)
                self._cond.wait(timeout if timeout is None else max(timeout, 0.001))

    def release(self, host: str) -> None:
        with self._cond:
            left = self._active.get(host, 1) - 1
            if left:
                self._active[host] = left
            else:
                self._active.pop(host, None)
            self._cond.notify_all()

    def back_off(self, host: str, seconds: float) -> None:
        """Delay every further request to ``host`` by ``seconds`` from now."""
        with self._cond:
            until = self._clock() + seconds
            self._not_before[host] = max(self._not_before.get(host, 0.0), until)

    def not_before(self, host: str) -> float:
        with self._cond:
            return self._not_before.get(host, 0.0)


_LIMITERS: Dict[int, HostLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def shared_host_limiter(per_host: int) -> HostLimiter:
    """The process-wide limiter for this per-host cap (shared by all DoFn instances)."""
    with _LIMITERS_LOCK:
        if per_host not in _LIMITERS:
            _LIMITERS[per_host] = HostLimiter(per_host)
        return _LIMITERS[per_host]


# --------------------------------------------------------------------------
# One HTTP exchange with a hard deadline


class _DeadlineReader(io.RawIOBase):
    """Socket reads that never run past the response deadline, however slowly bytes trickle."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """The socket handed to http.client: sends with a timeout, reads through _DeadlineReader."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline")
        self._sock.settimeout(remaining)
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline), _CHUNK)

    def close(self) -> None:
        # http.client closes the connection as soon as it sees "Connection: close", while the
        # response is still being read; the real socket is closed by _exchange when done.
        pass


_TLS_CONTEXT: Optional[ssl.SSLContext] = None


def _tls_context() -> ssl.SSLContext:
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        _TLS_CONTEXT = ssl.create_default_context()  # verifies certificates and host names
    return _TLS_CONTEXT


def _resolve(target: Target, resolver: Resolver) -> List[Tuple[int, IPAddress]]:
    """(family, address) pairs for the target, resolved once; FetchError "dns" on failure."""
    if target.ip is not None:
        family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
        return [(family, target.ip)]
    try:
        infos = resolver(target.host, target.port, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise _failed(f"dns: {getattr(exc, 'strerror', None) or exc}") from None
    out: List[Tuple[int, IPAddress]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        except ValueError:
            continue
        if (family, address) not in out:
            out.append((family, address))
    if not out:
        raise _failed("dns: no address")
    return out


def _check_addresses(target: Target, addresses: List[Tuple[int, IPAddress]],
                     config: FetchConfig, allowed: Set[Tuple[str, int]]) -> None:
    """Raise BLOCKED_ADDRESS if any address the host resolves to may not be contacted."""
    if not config.block_private_addresses or (target.host, target.port) in allowed:
        return
    for _family, address in addresses:
        if (str(address), target.port) in allowed:
            continue
        bad = blocked_address(address)
        if bad is not None:
            raise FetchError(Status.BLOCKED_ADDRESS, f"blocked_address: {bad}")


def _connect(target: Target, addresses: List[Tuple[int, IPAddress]],
             config: FetchConfig, deadline: float) -> socket.socket:
    """A connected (and for https, TLS-verified) socket to one of the checked addresses."""
    last: Optional[BaseException] = None
    for family, address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _failed("timeout: connect")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(min(config.connect_timeout, remaining))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect((str(address), target.port))
            if target.scheme == "https":
                sock = _tls_context().wrap_socket(sock, server_hostname=target.host)
            return sock
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise _failed(f"tls: {exc.verify_message or 'certificate'}") from None
        except ssl.SSLError as exc:
            sock.close()
            last = _failed(f"tls: {exc.reason or exc}", transient=False)
        except (socket.timeout, TimeoutError):
            sock.close()
            last = _failed("timeout: connect", transient=config.retry_timeouts)
        except ConnectionRefusedError:
            sock.close()
            last = _failed("connection: refused", transient=True)
        except OSError as exc:
            sock.close()
            last = _failed(f"connection: {exc.strerror or exc}", transient=True)
    assert last is not None
    raise last


@dataclasses.dataclass
class FetchResult:
    """The outcome of fetching one URL."""

    status: Status
    error: Optional[str] = None
    body: Optional[bytes] = None
    http_status: Optional[int] = None
    content_type: Optional[str] = None
    final_url: Optional[str] = None
    attempts: int = 1


def _read_body(response: http.client.HTTPResponse, config: FetchConfig) -> bytes:
    """The body, read in chunks with max_bytes enforced while reading and content sniffed early."""
    declared: Optional[int] = None
    length = response.getheader("Content-Length")
    if length is not None and response.getheader("Transfer-Encoding") is None:
        try:
            declared = int(length.strip())
        except ValueError:
            declared = None
    if declared is not None and declared > config.max_bytes:
        raise _failed(f"too_large: content-length {declared}")
    content_type = response.getheader("Content-Type")
    chunks: List[bytes] = []
    size = 0
    checked = False
    try:
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > config.max_bytes:
                raise _failed(f"too_large: over {config.max_bytes} bytes")
            if not checked and size >= _SNIFF_BYTES:
                # Stop early on an HTML error page instead of downloading all of it.
                checked = True
                problem = content_problem(b"".join(chunks)[:_SNIFF_BYTES], content_type)
                if problem:
                    raise _failed(problem)
    except http.client.IncompleteRead as exc:
        raise _failed(f"truncated: {size + len(exc.partial)} of {declared or 'chunked'} bytes",
                      transient=True) from None
    body = b"".join(chunks)
    if declared is not None and len(body) < declared:
        raise _failed(f"truncated: {len(body)} of {declared} bytes", transient=True)
    if not checked:
        problem = content_problem(body[:_SNIFF_BYTES], content_type)
        if problem:
            raise _failed(problem)
    return body


def url_deadline_seconds(config: FetchConfig) -> float:
    """How long one URL may take in all (fetch.url_deadline; unset: 3 x fetch.timeout)."""
    return config.url_deadline if config.url_deadline is not None else 3 * config.timeout


def _deadline_passed() -> FetchError:
    return _failed("timeout: deadline")


def _exchange(target: Target, config: FetchConfig, resolver: Resolver,
              allowed: Set[Tuple[str, int]], url_deadline: float
              ) -> Tuple[http.client.HTTPResponse, Optional[bytes], str]:
    """One request to one hop, ended by fetch.timeout or the URL's deadline, whichever is first.

    Returns (response, body or None for redirects, location)."""
    addresses = _resolve(target, resolver)
    _check_addresses(target, addresses, config, allowed)
    deadline = min(time.monotonic() + config.timeout, url_deadline)
    if deadline <= time.monotonic():
        raise _deadline_passed()
    sock = _connect(target, addresses, config, deadline)
    conn = http.client.HTTPConnection(target.host, target.port)
    conn.sock = _DeadlineSocket(sock, deadline)  # type: ignore[assignment]
    code: Optional[int] = None
    try:
        conn.request("GET", target.path, headers={
            "Host": target.host_header,
            "User-Agent": config.user_agent,
            "Accept": "image/*,*/*;q=0.8",
            "Connection": "close",
        })
        response = conn.getresponse()
        code = response.status
        if code in REDIRECT_HTTP:
            return response, None, response.getheader("Location") or ""
        if code in TRANSIENT_HTTP:
            raise _failed(f"http_{code}", transient=True, http_status=code,
                          retry_after=parse_retry_after(response.getheader("Retry-After")))
        if not 200 <= code < 300:
            raise _failed(f"http_{code}", http_status=code)
        directive = robots_disallowed(response.headers.get_all("X-Robots-Tag") or [],
                                      config.user_agent_token, config.disallowed_header_directives)
        if directive:
            raise FetchError(Status.DISALLOWED, f"x_robots_tag: {directive}", http_status=code)
        return response, _read_body(response, config), ""
    except FetchError as exc:
        if exc.http_status is None:
            exc.http_status = code
        raise
    except (socket.timeout, TimeoutError):
        if time.monotonic() >= url_deadline:
            raise _deadline_passed() from None
        raise _failed("timeout", transient=config.retry_timeouts) from None
    except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
        raise _failed(f"connection_reset: {type(exc).__name__}", transient=True) from None
    except http.client.HTTPException as exc:
        raise _failed(f"bad_response: {type(exc).__name__}") from None
    except ssl.SSLError as exc:
        raise _failed(f"tls: {exc.reason or exc}") from None
    except OSError as exc:
        raise _failed(f"connection: {exc.strerror or exc}", transient=True) from None
    finally:
        conn.close()
        sock.close()


def allowed_pairs(config: FetchConfig) -> Set[Tuple[str, int]]:
    """config.allowed_hosts as canonical (host, port) pairs."""
    return {parse_host_port(entry) for entry in config.allowed_hosts}


def _follow(url: str, config: FetchConfig, resolver: Resolver, allowed: Set[Tuple[str, int]],
            host_limiter: Optional[HostLimiter], deadline: float) -> FetchResult:
    """One attempt: the request and its redirect chain, each hop checked, all before ``deadline``."""
    seen = {url}
    current = url
    for _hop in range(config.max_redirects + 1):
        target = parse_target(current)
        if host_limiter is not None:
            # Wait for a slot (and for any Retry-After on this host), but not forever.
            limit = min(time.monotonic() + config.timeout + config.retry_after_max, deadline)
            if not host_limiter.acquire(target.host, deadline=limit):
                raise _deadline_passed() if limit == deadline else _failed("timeout: host busy")
        try:
            response, body, location = _exchange(target, config, resolver, allowed, deadline)
        except FetchError as exc:
            if exc.http_status == 429 and host_limiter is not None:
                wait = exc.retry_after if exc.retry_after is not None else config.backoff_base
                host_limiter.back_off(target.host, min(wait, config.retry_after_max))
            raise
        finally:
            if host_limiter is not None:
                host_limiter.release(target.host)
        if body is not None:
            return FetchResult(Status.OK, None, body, response.status,
                               response.getheader("Content-Type"), current)
        if not location:
            raise _failed(f"http_{response.status}: redirect without location",
                          http_status=response.status)
        following = urllib.parse.urljoin(current, location.strip())
        following = urllib.parse.urldefrag(following)[0]
        if following in seen:
            raise _failed("redirect_loop", http_status=response.status)
        seen.add(following)
        current = following
    raise _failed(f"too_many_redirects: over {config.max_redirects}")


def fetch_url(url: str, config: FetchConfig, *, resolver: Resolver = socket.getaddrinfo,
              host_limiter: Optional[HostLimiter] = None, rng: Optional[random.Random] = None,
              sleep: Callable[[float], None] = time.sleep,
              allowed: Optional[Set[Tuple[str, int]]] = None) -> FetchResult:
    """Fetch one URL under ``config``; never raises for anything a server or URL can do.

    Everything (attempts, redirect hops, waits for a host slot, backoffs and Retry-After
    waits) ends by the URL's deadline (``url_deadline_seconds``): an exchange it cuts short
    fails as "timeout: deadline"; a retry whose wait would pass it is not made, and the
    last failure stands.
    """
    allowed = allowed_pairs(config) if allowed is None else allowed
    deadline = time.monotonic() + url_deadline_seconds(config)
    attempt = 0
    while True:
        try:
            result = _follow(url, config, resolver, allowed, host_limiter, deadline)
            result.attempts = attempt + 1
            return result
        except FetchError as exc:
            failure = exc
        if not failure.transient or attempt >= config.retries:
            break
        if failure.retry_after is not None:
            if failure.retry_after > config.retry_after_max:
                break  # the server asks for longer than we will wait: give up politely
            # Honoured for any status (503 too); for a 429 the limiter holds the whole host
            # back as well, so this sleep and the limiter end at the same time.
            delay = failure.retry_after
        else:
            delay = backoff_delay(attempt, config.backoff_base, config.backoff_max, rng)
        if time.monotonic() + delay >= deadline:
            break  # the retry could not even start in time
        if delay > 0:
            sleep(delay)
        attempt += 1
    return FetchResult(failure.status, failure.error, None, failure.http_status, None, None,
                       attempts=attempt + 1)


def apply_fetch(record: dict, result: FetchResult) -> dict:
    """Fill a live record from a fetch result (raw bytes, sha256, http fields) or mark it."""
    record["http_status"] = result.http_status
    if result.status is Status.OK and result.body is not None:
        record["raw"] = result.body
        record["sha256"] = hashlib.sha256(result.body).hexdigest()
        record["content_type"] = result.content_type
        return record
    return mark(record, result.status, result.error)


def fetch_record(record: dict, config: FetchConfig, **kwargs) -> dict:
    """Fetch a live record's URL into it (non-live records are returned untouched)."""
    if not is_live(record):
        return record
    return apply_fetch(record, fetch_url(record["url"], config, **kwargs))


# --------------------------------------------------------------------------
# Beam wrapper


class _FetchDoFn(ConcurrentRecordFn):
    """Fetches live records on a thread pool (see ConcurrentRecordFn)."""

    failure_status = Status.FETCH_FAILED
    namespace = "fetch"

    def __init__(self, config: FetchConfig, progress: Optional[str] = None):
        super().__init__(config.threads, progress)
        self._config = config

    def setup(self) -> None:
        super().setup()
        self._limiter = shared_host_limiter(self._config.per_host_concurrency)
        self._allowed = allowed_pairs(self._config)
        self._bytes = beam.metrics.Metrics.counter("fetch", "bytes")

    def work(self, record: dict) -> None:
        fetch_record(record, self._config, host_limiter=self._limiter, allowed=self._allowed)

    def count(self, record: dict) -> None:
        # Beam metrics are per thread: count on the bundle's thread, not the pool's.
        super().count(record)
        if record.get("raw"):
            self._bytes.inc(len(record["raw"]))


class FetchImages(beam.PTransform):
    """Records -> the same records, live ones fetched (raw, sha256, http_status, content_type) or marked."""

    def __init__(self, config: FetchConfig, progress: Optional[str] = None):
        super().__init__()
        self._config = config
        self._progress = progress

    def expand(self, records):
        return records | "Fetch" >> beam.ParDo(_FetchDoFn(self._config, self._progress))
