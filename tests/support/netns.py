"""A network link a test can cut: the benchmarks' veth pair between two namespaces (scripts/bench/benchnet.py).

``ShapedLink`` makes namespaces ``client`` and ``server`` (names unique to the process) joined by a
veth pair; ``relay(link, port)`` serves root 127.0.0.1:*port* (a registry fixture) to the client
namespace at ``10.213.0.2:5000``. Run a process in the client namespace with
``link.nsenter("client") + [...]``; ``cut(link)`` / ``mend(link)`` take the client's end of the
link down and up. Nothing touches the root namespace's interfaces.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "scripts", "bench", "benchnet.py")
_spec = importlib.util.spec_from_file_location("lazyfs_benchnet", _PATH)
benchnet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchnet)

ShapedLink = benchnet.ShapedLink
relay = benchnet.relay


def cut(link: ShapedLink) -> None:
    """Take the client namespace's end of the veth down: packets to the server side go nowhere."""
    subprocess.run(["ip", "-n", link.names["client"], "link", "set", link.veth["client"], "down"], check=True,
                   timeout=30, capture_output=True)


def mend(link: ShapedLink) -> None:
    subprocess.run(["ip", "-n", link.names["client"], "link", "set", link.veth["client"], "up"], check=True,
                   timeout=30, capture_output=True)
