"""A small fault-injecting HTTP proxy for tests and benchmarks (stdlib only, 127.0.0.1).

It sits between tensorstore and a local object-store server (moto, the GCS
emulator) as a *reverse* proxy: point the client's endpoint at
:attr:`FaultProxy.url` and every request is forwarded, byte for byte and with
its ``Host`` header unchanged (S3 signatures stay valid), to ``upstream``.
On the way it

- counts requests by method (:attr:`FaultProxy.counts`), which the benchmark
  uses for "requests per save";
- fails a fraction of them with an HTTP status (5xx or 429) *without*
  forwarding them, so the server never sees a failed request;
- drops a fraction of them: the request is read, then the connection is reset
  (TCP RST) with no response, like a load balancer dying mid-request;
- or, with ``down=True``, answers every request with 503 (a persistent outage);
- or, with ``stall=True``, reads each request and never answers it (until
  ``timeout`` seconds pass or the proxy stops): a hung server;
- or, with ``trickle=N``, forwards each request but sends the answer's body at
  N bytes per second: a link that moves, too slowly to ever finish.

``only="leases/"`` limits the faults to requests whose path contains that text
(the others are forwarded and counted as usual): a lease store that fails.

Faults are drawn from a seeded ``random.Random``, so a run is reproducible for
a given request order.  Everything is bounded: at most ``max_connections``
client connections are served at once (others wait in the listen backlog) and
upstream sockets time out after ``timeout`` seconds.

Example::

    with FaultProxy("http://127.0.0.1:9000", fail_rate=0.2, drop_rate=0.1) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
        print(proxy.counts)   # Counter({'PUT': 12, 'GET': 3, ...})
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import socketserver
import struct
import threading
import urllib.parse
from typing import Any

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


class FaultProxy:
    """A reverse HTTP proxy on 127.0.0.1 that counts, fails and drops requests.

    Args:
      upstream: the server's base URL, e.g. ``"http://127.0.0.1:9000"`` (http only).
      fail_rate: fraction of requests answered with ``fail_status`` instead of forwarded.
      fail_status: the status of a failed request (500, 503, 429, ...).
      drop_rate: fraction of requests whose connection is reset without a response.
      seed: seed of the fault draws.
      max_connections: client connections served at once.
      timeout: seconds an upstream connection may stall before the request fails with 502.
      trickle: bytes per second of every answer's body (0: full speed).

    Raises:
      ValueError: for a non-http upstream or rates outside [0, 1].
    """

    def __init__(
        self,
        upstream: str,
        *,
        fail_rate: float = 0.0,
        fail_status: int = 503,
        drop_rate: float = 0.0,
        seed: int = 0,
        max_connections: int = 64,
        timeout: float = 30.0,
        trickle: int = 0,
    ):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream!r}")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.timeout = timeout
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()
        self._stopping = threading.Event()
        self.configure(
            fail_rate=fail_rate, fail_status=fail_status, drop_rate=drop_rate, down=False, stall=False,
            trickle=trickle, only="",
        )
        self._slots = threading.BoundedSemaphore(max_connections)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None

    # -- configuration ------------------------------------------------------
    def configure(
        self,
        *,
        fail_rate: float | None = None,
        fail_status: int | None = None,
        drop_rate: float | None = None,
        down: bool | None = None,
        stall: bool | None = None,
        trickle: int | None = None,
        only: str | None = None,
    ) -> None:
        """Changes the faults of requests that arrive from now on (None keeps a setting).

        Raises:
          ValueError: for a rate outside [0, 1] or rates summing past 1.
        """
        with self._lock:
            fail = self.fail_rate if fail_rate is None else fail_rate
            drop = self.drop_rate if drop_rate is None else drop_rate
            if not (0.0 <= fail <= 1.0 and 0.0 <= drop <= 1.0 and fail + drop <= 1.0):
                raise ValueError(f"fail_rate={fail} and drop_rate={drop} must lie in [0, 1], sum <= 1")
            self.fail_rate, self.drop_rate = fail, drop
            if fail_status is not None:
                self.fail_status = fail_status
            if down is not None:
                self.down = down
            if stall is not None:
                self.stall = stall
            if trickle is not None:
                self.trickle = trickle
            if only is not None:
                self.only = only

    def reset_counts(self) -> None:
        """Zeroes :attr:`counts` and :attr:`injected`."""
        with self._lock:
            self.counts.clear()
            self.injected.clear()

    @property
    def total(self) -> int:
        """Requests received since the last :meth:`reset_counts` (faulted ones included)."""
        with self._lock:
            return sum(self.counts.values())

    # -- lifecycle ----------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: give this to the client as its endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- per request --------------------------------------------------------
    def _decide(self, method: str, path: str) -> str:
        """Counts a request and returns its fate: "forward", "fail", "drop", "down", "stall" or "trickle"."""
        with self._lock:
            self.counts[method] += 1
            if self.only and self.only not in urllib.parse.unquote(path):
                fate = "forward"
            elif self.stall:
                fate = "stall"
            elif self.down:
                fate = "down"
            elif self.trickle:
                fate = "trickle"
            else:
                draw = self._rng.random()
                fate = (
                    "fail"
                    if draw < self.fail_rate
                    else "drop"
                    if draw < self.fail_rate + self.drop_rate
                    else "forward"
                )
            if fate != "forward":
                self.injected[fate] += 1
            return fate


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    proxy: FaultProxy

    def process_request(self, request: Any, client_address: Any) -> None:
        self.proxy._slots.acquire()
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.proxy._slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered for us
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]] = (),
        length: str | None = None,
        trickle: int = 0,
    ) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        # A HEAD answer carries the length of the body it did not send.
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if not trickle:
            self.wfile.write(body)
            return
        piece = max(1, trickle // 10)  # ten writes a second
        stopping = self.server.proxy._stopping
        for start in range(0, len(body), piece):
            if stopping.wait(piece / trickle):
                return
            try:
                self.wfile.write(body[start : start + piece])
                self.wfile.flush()
            except OSError:  # the client gave up
                return

    def _reset(self) -> None:
        """Closes the connection with a TCP RST (SO_LINGER 0), no response sent."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        fate = proxy._decide(self.command, self.path)
        if fate == "stall":
            proxy._stopping.wait(proxy.timeout)
            self._reset()
            return
        if fate == "drop":
            self._reset()
            return
        if fate in ("fail", "down"):
            status = 503 if fate == "down" else proxy.fail_status
            message = b"<Error><Code>SlowDown</Code><Message>injected by faultproxy</Message></Error>"
            self._reply(status, message, [("Content-Type", "application/xml"), ("Retry-After", "0")])
            return
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=proxy.timeout)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST", "PATCH"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            length = response.getheader("Content-Length")
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            status = response.status
        except OSError as error:
            status, data, headers, length = 502, f"faultproxy: upstream failed: {error}".encode(), [], None
        finally:
            upstream.close()
        self._reply(status, data, headers, length, trickle=proxy.trickle if fate == "trickle" else 0)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle
