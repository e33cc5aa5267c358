"""A forward HTTP proxy on 127.0.0.1, for testing that clients honour HTTPS_PROXY / HTTP_PROXY.

``ForwardProxy(names={"registry.test": "127.0.0.1"})`` listens on a free loopback port and
serves ``CONNECT host:port`` tunnels (what an HTTPS client asks a proxy for) and absolute-form
``GET http://host:port/path`` requests (plain HTTP through a proxy). It resolves host names
only through *names*, so a client that reaches a name only the proxy knows has provably gone
through it. ``requests`` records ``(method, target)`` of every request. Threads, bounded by
socket timeouts; ``close()`` (or the context manager) stops it.
"""

from __future__ import annotations

import select
import socket
import socketserver
import threading
from collections.abc import Mapping


class ForwardProxy:
    def __init__(self, names: Mapping[str, str] | None = None, *, idle_timeout: float = 30.0) -> None:
        self.names = dict(names or {})
        self.idle_timeout = idle_timeout
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="forward-proxy", daemon=True)
        self._thread.start()

    def count(self, method: str) -> int:
        with self._lock:
            return sum(1 for m, _ in self.requests if m == method)

    def _resolve(self, hostport: str) -> tuple[str, int]:
        host, _, port = hostport.rpartition(":")
        return self.names.get(host, host if host in ("127.0.0.1", "localhost") else "0.0.0.0"), int(port)

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(self.idle_timeout)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            piece = client.recv(65536)
            if not piece:
                return
            head += piece
        line, _, rest = head.partition(b"\r\n")
        method, target, _ = line.decode("latin-1").split(" ", 2)
        with self._lock:
            self.requests.append((method, target))
        try:
            if method == "CONNECT":
                upstream = socket.create_connection(self._resolve(target), timeout=self.idle_timeout)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                leftover = rest.partition(b"\r\n\r\n")[2]
            else:  # absolute form: http://host:port/path
                hostport, _, path = target.removeprefix("http://").partition("/")
                if ":" not in hostport:
                    hostport += ":80"
                upstream = socket.create_connection(self._resolve(hostport), timeout=self.idle_timeout)
                leftover = f"{method} /{path} HTTP/1.1\r\n".encode() + rest
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        with upstream:
            if leftover:
                upstream.sendall(leftover)
            self._pipe(client, upstream)

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sockets = [a, b]
        while True:
            ready, _, _ = select.select(sockets, [], [], self.idle_timeout)
            if not ready:
                return
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                (b if s is a else a).sendall(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(30)

    def __enter__(self) -> ForwardProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
