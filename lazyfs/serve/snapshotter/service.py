"""`lazyfs snapshotter`: containerd's snapshots v1 gRPC service on a unix socket (a proxy plugin).

containerd talks to it through ``[proxy_plugins]`` (see contrib/containerd/). The service is a
thin shell: it converts messages to and from `core.Snapshotter` calls and lazyfs errors to the
gRPC status codes containerd's errdefs understand.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from lazyfs.config import Config
from lazyfs.errors import AlreadyExistsError, BusyError, ConfigError, LazyfsError, NotFoundError, describe
from lazyfs.nursery import single_error
from lazyfs.serve import system
from lazyfs.serve.snapshotter import api
from lazyfs.serve.snapshotter.core import Snapshotter
from lazyfs.serve.snapshotter.table import ACTIVE, COMMITTED, VIEW, Snapshot

log = logging.getLogger("lazyfs.snapshotter")
DEFAULT_ADDRESS = "/run/lazyfs/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/lazyfs/snapshotter"
WALK_BATCH = 100


def _status(exc: BaseException):
    import grpc

    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, AlreadyExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, BusyError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.UNKNOWN


def _rpc(method):
    """Run one request; a lazyfs error becomes its status code, anything else UNKNOWN (and a log line)."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as raised:
            exc = single_error(raised)
            if isinstance(exc, (LazyfsError, OSError)):
                if not isinstance(exc, (NotFoundError, AlreadyExistsError)):
                    log.warning("%s: %s", method.__name__, describe(exc))
                context.abort(_status(exc), describe(exc))
            log.error("%s failed", method.__name__, exc_info=exc)  # a bug must not take the service down
            context.abort(_status(exc), f"{type(exc).__name__}: {describe(exc)}")
    return wrapper


def _walk_stream(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as raised:
            exc = single_error(raised)
            if not isinstance(exc, LazyfsError):
                raise exc
            context.abort(_status(exc), describe(exc))
    return wrapper


class SnapshotsService:
    """containerd.services.snapshots.v1.Snapshots over a Snapshotter."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter
        self.pb = api.load()

    # ---------------------------------------------------------- conversions

    def _info(self, snap: Snapshot):
        from google.protobuf.timestamp_pb2 import Timestamp

        kinds = {VIEW: self.pb.snapshots.VIEW, ACTIVE: self.pb.snapshots.ACTIVE, COMMITTED: self.pb.snapshots.COMMITTED}
        return self.pb.snapshots.Info(
            name=snap.key, parent=snap.parent, kind=kinds[snap.kind],
            created_at=Timestamp(seconds=snap.created // 10**9, nanos=snap.created % 10**9),
            updated_at=Timestamp(seconds=snap.updated // 10**9, nanos=snap.updated % 10**9),
            labels=snap.labels)

    def _mounts(self, mounts) -> list:
        return [self.pb.mount.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]

    # ---------------------------------------------------------- methods

    @_rpc
    def Prepare(self, request, context):
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return self.pb.snapshots.PrepareSnapshotResponse(mounts=self._mounts(mounts))

    @_rpc
    def View(self, request, context):
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return self.pb.snapshots.ViewSnapshotResponse(mounts=self._mounts(mounts))

    @_rpc
    def Mounts(self, request, context):
        return self.pb.snapshots.MountsResponse(mounts=self._mounts(self.sn.mounts(request.key)))

    @_rpc
    def Commit(self, request, context):
        from google.protobuf.empty_pb2 import Empty

        self.sn.commit(request.name, request.key, dict(request.labels))
        return Empty()

    @_rpc
    def Remove(self, request, context):
        from google.protobuf.empty_pb2 import Empty

        self.sn.remove(request.key)
        return Empty()

    @_rpc
    def Stat(self, request, context):
        return self.pb.snapshots.StatSnapshotResponse(info=self._info(self.sn.stat(request.key)))

    @_rpc
    def Update(self, request, context):
        snap = self.sn.update(request.info.name, dict(request.info.labels), list(request.update_mask.paths))
        return self.pb.snapshots.UpdateSnapshotResponse(info=self._info(snap))

    @_walk_stream
    def List(self, request, context):
        batch = []
        for snap in self.sn.walk(list(request.filters)):
            batch.append(self._info(snap))
            if len(batch) >= WALK_BATCH:
                yield self.pb.snapshots.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield self.pb.snapshots.ListSnapshotsResponse(info=batch)

    @_rpc
    def Usage(self, request, context):
        size, inodes = self.sn.usage(request.key)
        return self.pb.snapshots.UsageResponse(size=size, inodes=inodes)

    @_rpc
    def Cleanup(self, request, context):
        from google.protobuf.empty_pb2 import Empty

        self.sn.cleanup()
        return Empty()


def serve(address: str, snapshotter: Snapshotter, stop: threading.Event, *, workers: int = 16) -> None:
    """Answer on unix socket *address* (mode 0600) until *stop* is set."""
    import grpc

    pb = api.load()
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshotter"))
    pb.snapshots_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    directory = os.path.dirname(os.path.abspath(address))
    if directory == os.path.abspath(snapshotter.config.run_dir):
        system.private_dir(directory)  # /run/lazyfs: the daemon's run dir, private whoever made it first
    else:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.lexists(address):
        os.unlink(address)
    old = os.umask(0o077)
    try:
        server.add_insecure_port("unix:" + os.path.abspath(address))
    finally:
        os.umask(old)
    server.start()
    log.info("lazyfs snapshotter %d ready on %s (root %s, writable root %s, lazyfs mode %s)", os.getpid(), address,
             snapshotter.root, snapshotter.writable_root, snapshotter.mode)
    try:
        stop.wait()
    finally:
        # running containers keep their mounts: nothing is unmounted on the way out
        server.stop(grace=5).wait(10)
        if os.path.lexists(address):
            os.unlink(address)
        log.info("lazyfs snapshotter stopped")


def main(config: Config, config_path: str | None, address: str, root: str, writable_root: str, mode: str) -> int:
    logging.basicConfig(level=getattr(logging, config.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per registry request otherwise
    api.load()  # generate the stubs now, not in the first request
    snapshotter = Snapshotter(root, writable_root, config, config_path, mode)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for problem in snapshotter.recover():
            log.error("restart: %s", problem)
        serve(address, snapshotter, stop)
    finally:
        snapshotter.close()
    return 0
