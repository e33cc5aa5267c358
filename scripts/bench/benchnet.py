"""A shaped network link for benchmarks: two network namespaces joined by a veth pair.

``ShapedLink(rate_mbit)`` creates namespaces ``client`` and ``server`` (names
unique to this process), a veth pair between them (10.213.0.1 <-> 10.213.0.2)
and a ``tbf`` qdisc of *rate_mbit* on both ends; leaving the block deletes
both namespaces (which destroys the veth pair). Nothing touches the root
namespace's interfaces.

``relay(link, upstream_port)`` makes a service on the root namespace's
127.0.0.1 reachable from the client namespace across the link: a relay process
listens in the server namespace on 10.213.0.2 and forwards every connection
to 127.0.0.1:upstream_port. So a registry (and a ``FaultProxy`` adding
latency) can stay on loopback, and only what a client in the client namespace
fetches crosses the shaped veth. Run a client there with
``link.nsenter("client") + [command...]`` (``nsenter --net`` only: mounts and
files are shared with the host).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

CLIENT_ADDR, SERVER_ADDR = "10.213.0.1", "10.213.0.2"
RELAY_PORT = 5000
CLONE_NEWNET = 0x40000000
IDLE_TIMEOUT = 600.0  # seconds a relayed connection may stay silent


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)


class ShapedLink:
    """Namespaces ``client`` and ``server`` joined by veth, each direction shaped to *rate_mbit*."""

    def __init__(self, rate_mbit: float, tag: str = "") -> None:
        base = f"lzb{tag}{os.getpid() % 100000}"
        self.names = {"client": base + "c", "server": base + "s"}
        self.veth = {"client": base + "vc", "server": base + "vs"}
        self.rate_mbit = rate_mbit
        self._made: list[str] = []

    def path(self, which: str) -> str:
        return f"/run/netns/{self.names[which]}"

    def nsenter(self, which: str) -> list[str]:
        """A command prefix that runs in the *which* namespace (network only)."""
        return ["nsenter", f"--net={self.path(which)}"]

    def __enter__(self) -> "ShapedLink":
        try:
            for which in ("client", "server"):
                _ip("netns", "add", self.names[which])
                self._made.append(self.names[which])
            # Created inside the client namespace, so no interface ever exists in the root one.
            _ip("-n", self.names["client"], "link", "add", self.veth["client"], "type", "veth",
                "peer", "name", self.veth["server"], "netns", self.names["server"])
            for which, addr in (("client", CLIENT_ADDR), ("server", SERVER_ADDR)):
                ns = self.names[which]
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", self.veth[which])
                _ip("-n", ns, "link", "set", self.veth[which], "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            self.set_rate(self.rate_mbit, add=True)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def set_rate(self, rate_mbit: float, *, add: bool = False) -> None:
        """tbf on both veth ends: *rate_mbit*, a burst of >= 1 ms of traffic, 50 ms of queue."""
        self.rate_mbit = rate_mbit
        burst = max(64 << 10, int(rate_mbit * 1e6 / 8 / 1000))
        for which in ("client", "server"):
            subprocess.run(["tc", "-n", self.names[which], "qdisc", "add" if add else "change",
                            "dev", self.veth[which], "root", "tbf", "rate", f"{rate_mbit}mbit",
                            "burst", str(burst), "latency", "50ms"], check=True, timeout=30, capture_output=True)

    def __exit__(self, *exc: object) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], timeout=30, capture_output=True)
        self._made.clear()


def setns_net(path: str) -> None:
    """Move the calling thread (only) into the network namespace at *path*."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def listener_in(ns_path: str, addr: str, port: int) -> socket.socket:
    """A listening TCP socket created inside the namespace at *ns_path* (by a short-lived thread)."""
    made: list = []

    def make() -> None:
        try:
            setns_net(ns_path)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            s.listen(128)
            made.append(s)
        except BaseException as exc:  # handed to the caller
            made.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join(30)
    if not made:
        raise RuntimeError("listener thread did not finish")
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        src.settimeout(IDLE_TIMEOUT)
        while True:  # bounded: ends at EOF, an error, or IDLE_TIMEOUT of silence
            data = src.recv(256 << 10)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve_connection(conn: socket.socket, upstream_port: int) -> None:
    try:
        up = socket.create_connection(("127.0.0.1", upstream_port), timeout=30)
    except OSError:
        conn.close()
        return
    for s in (conn, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=_pump, args=(up, conn), daemon=True)
    t.start()
    _pump(conn, up)
    t.join(IDLE_TIMEOUT)
    conn.close()
    up.close()


def relay_main(ns_path: str, addr: str, port: int, upstream_port: int) -> None:
    """Relay process: accept in the namespace at *ns_path*, forward to root 127.0.0.1:*upstream_port*.

    Prints ``ready`` once listening; exits when its stdin closes.
    """
    listener = listener_in(ns_path, addr, port)

    def accept_forever() -> None:
        while True:  # bounded by the process's life: it exits when stdin closes
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve_connection, args=(conn, upstream_port), daemon=True).start()

    threading.Thread(target=accept_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    listener.close()


@contextlib.contextmanager
def relay(link: ShapedLink, upstream_port: int) -> Iterator[str]:
    """Serve root 127.0.0.1:*upstream_port* to the client namespace; yields ``"10.213.0.2:5000"``."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "relay", link.path("server"), SERVER_ADDR,
                             str(RELAY_PORT), str(upstream_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"relay did not start (exit {proc.poll()})")
        yield f"{SERVER_ADDR}:{RELAY_PORT}"
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "relay":
        relay_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit("usage: benchnet.py relay NETNS_PATH ADDR PORT UPSTREAM_PORT")
