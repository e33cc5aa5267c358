"""Python gRPC stubs for containerd's API, generated from containerd's own .proto files on first use.

Nothing generated is kept in the source tree. The first import compiles the .proto files of the
containerd API (Debian ships them in golang-github-containerd-containerd-dev, under
/usr/share/gocode/src) with grpcio-tools into a cache directory keyed by the digest of the inputs
and the grpcio-tools version, and later imports reuse it:

* ``$LAZYFS_PROTO_CACHE`` if set, else ``$XDG_CACHE_HOME/lazyfs/containerd-api`` (default
  ``~/.cache/lazyfs/containerd-api``);
* the .proto sources are searched in ``$LAZYFS_CONTAINERD_PROTOS`` (a GOPATH-style ``src`` dir
  holding ``github.com/containerd/containerd/api`` and ``github.com/gogo/protobuf``), then
  ``/usr/share/gocode/src``.

The files are staged under one private top-level package, ``lazyfs_containerd_api``, with their
imports rewritten to match: the proto packages (and so the gRPC service names on the wire) stay
``containerd.services.*``, while Python never sees a top-level ``github`` package that could
shadow another distribution's.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
import threading
from types import SimpleNamespace

from lazyfs.errors import ConfigError

PACKAGE = "lazyfs_containerd_api"
SEARCH_PATH = ("/usr/share/gocode/src",)
_API = "github.com/containerd/containerd/api/"
_GOGO = "github.com/gogo/protobuf/gogoproto/gogo.proto"
# what lazyfs uses: the snapshotter service it serves, and what `lazyfs rpull` calls
PROTOS = (
    "types/mount.proto",
    "types/descriptor.proto",
    "services/snapshots/v1/snapshots.proto",
    "services/content/v1/content.proto",
    "services/images/v1/images.proto",
    "services/leases/v1/leases.proto",
    "services/diff/v1/diff.proto",
)
_IMPORT = re.compile(r'^(\s*import\s+(?:weak\s+|public\s+)?")([^"]+)(";)', re.M)
_lock = threading.Lock()
_loaded: SimpleNamespace | None = None


def _source_root() -> str:
    candidates = [os.environ["LAZYFS_CONTAINERD_PROTOS"]] if os.environ.get("LAZYFS_CONTAINERD_PROTOS") else []
    candidates += list(SEARCH_PATH)
    for root in candidates:
        if os.path.exists(os.path.join(root, _API, PROTOS[0])) and os.path.exists(os.path.join(root, _GOGO)):
            return root
    raise ConfigError(
        "containerd's API .proto files were not found (looked in " + ", ".join(candidates) + "); install "
        "Debian's golang-github-containerd-containerd-dev or set LAZYFS_CONTAINERD_PROTOS to a GOPATH src dir")


def _cache_root() -> str:
    if os.environ.get("LAZYFS_PROTO_CACHE"):
        return os.environ["LAZYFS_PROTO_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lazyfs", "containerd-api")


def _rewrite(text: str) -> str:
    """Point imports of the staged files at their staged names."""
    def sub(m: re.Match) -> str:
        path = m.group(2)
        if path.startswith(_API):
            path = f"{PACKAGE}/{path[len(_API):]}"
        elif path == "gogoproto/gogo.proto":
            path = f"{PACKAGE}/gogoproto/gogo.proto"
        return m.group(1) + path + m.group(3)
    return _IMPORT.sub(sub, text)


def _sources(root: str) -> dict[str, bytes]:
    files = {f"{PACKAGE}/{p}": os.path.join(root, _API, p) for p in PROTOS}
    files[f"{PACKAGE}/gogoproto/gogo.proto"] = os.path.join(root, _GOGO)
    out = {}
    for staged, real in files.items():
        with open(real, "rb") as f:
            out[staged] = _rewrite(f.read().decode()).encode()
    return out


def _generate(sources: dict[str, bytes], target: str) -> None:
    """Compile *sources* into *target* (made atomically: a half-written cache is never used)."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        raise ConfigError("grpcio-tools is not installed (pip install grpcio grpcio-tools)") from None
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".gen-", dir=parent)
    try:
        staging, out = os.path.join(work, "protos"), os.path.join(work, "out")
        for staged, data in sources.items():
            os.makedirs(os.path.join(staging, os.path.dirname(staged)), exist_ok=True)
            with open(os.path.join(staging, staged), "wb") as f:
                f.write(data)
        os.makedirs(out)
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        args = ["grpc_tools.protoc", f"-I{staging}", f"-I{well_known}", f"--python_out={out}",
                f"--grpc_python_out={out}", *sorted(sources)]
        if protoc.main(args) != 0:
            raise ConfigError(f"protoc failed on containerd's API protos (staged in {staging})")
        for dirpath, _, _ in os.walk(os.path.join(out, PACKAGE)):
            open(os.path.join(dirpath, "__init__.py"), "a").close()
        try:
            os.rename(out, target)
        except OSError:
            if not os.path.isdir(target):  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load() -> SimpleNamespace:
    """The generated modules (``snapshots``, ``snapshots_grpc``, ``mount``, ``content``, ...)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        sources = _sources(_source_root())
        try:
            from importlib.metadata import version
            tools = version("grpcio-tools")
        except Exception:
            tools = "unknown"
        key = hashlib.sha256(repr((tools, sorted(sources.items()))).encode()).hexdigest()[:16]
        target = os.path.join(_cache_root(), key)
        if not os.path.isdir(os.path.join(target, PACKAGE)):
            _generate(sources, target)
        if target not in sys.path:
            sys.path.append(target)
        mods = {}
        for proto in PROTOS:
            name = os.path.basename(proto).removesuffix(".proto")
            dotted = f"{PACKAGE}.{proto.removesuffix('.proto').replace('/', '.')}"
            mods[name] = importlib.import_module(dotted + "_pb2")
            mods[name + "_grpc"] = importlib.import_module(dotted + "_pb2_grpc")
        _loaded = SimpleNamespace(**mods)
        return _loaded
