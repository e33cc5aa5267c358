"""A lazyfs FUSE export server for tests, run as a subprocess.

    python3 tests/serve/fuse_server.py MOUNTPOINT --export SPEC [--export SPEC ...]

SPEC is comma-separated ``key=value``: ``name=NAME`` plus either
``size=BYTES[,seed=N]`` (a MemorySource, zeros or ``random.Random(N).randbytes``)
or ``file=PATH`` (a file-backed source); optional ``ro=1`` (read-only) and
``fail=OFFSET+LENGTH``, ``bug=OFFSET+LENGTH``, ``gate=A+B`` (see FaultSource).
``stack=SEED,flat=DIR[,layers=N]`` exports instead a read-only MergedDevice over ``make_stack(SEED, N)``
with its flat layer files in DIR (a FlatCache) and a CountingSource as its chunk store (``stats`` shows its
``store_gets`` and the flat cache's counters).

Prints ``ready`` once mounted, then answers one line per command read from
stdin, ``ok JSON`` or ``error MESSAGE``:

    stats               ExportFS.statistics() plus each source's flush count
    add SPEC            add an export
    remove NAME [WAIT]  remove an export, waiting up to WAIT s for handles to go
    attach NAME [ro]    losetup_attach the export's disk.img from inside the daemon
    detach DEV          losetup_detach
    loops NAME          find_loop_devices for the export's disk.img
    passthrough NAME PATH  pass every later open of NAME through to local file PATH (own front end)

Serves until SIGTERM/SIGINT or stdin closes, then unmounts and exits 0.

The front end is lazyfs's own kernel-protocol one (``lazyfs.serve.fusekernel``), or the pyfuse3
one with ``LAZYFS_FUSE_FRONTEND=pyfuse3`` in the environment. ``LAZYFS_FUSE_THREADS=N``: the own
front end reads the connection with N worker threads (``Session.serve(threads=N)``);
``LAZYFS_FUSE_NATIVE=0``: they answer reads in Python only (no C path, ``fuse_native_reads``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys

import trio

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from lazyfs.device.source import BlockSource, check_write, clamp_read  # noqa: E402
from lazyfs.errors import IntegrityError, LazyfsError, ReadOnlyError  # noqa: E402
from lazyfs.serve import system  # noqa: E402
if os.environ.get("LAZYFS_FUSE_FRONTEND") == "pyfuse3":  # the old libfuse front end, kept as a fallback
    from lazyfs.serve.fuse import IMAGE_NAME, ExportFS, serve  # noqa: E402
else:  # the default: lazyfs speaks the kernel protocol itself
    from lazyfs.serve.fusekernel.exports import IMAGE_NAME, ExportFS  # noqa: E402
    from lazyfs.serve.fusekernel.session import serve  # noqa: E402
from tests.support.memory import MemorySource  # noqa: E402


class FileSource(BlockSource):
    """A regular file as a block source (pread/pwrite in threads, fsync on flush)."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.read_only = read_only
        self.flushes = 0

    async def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        return await trio.to_thread.run_sync(os.pread, self.fd, n, offset) if n else b""

    async def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise ReadOnlyError("file source is read-only")
        check_write(self.size, offset, len(data))
        await trio.to_thread.run_sync(os.pwrite, self.fd, data, offset)

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self.fd)
        self.flushes += 1

    async def aclose(self) -> None:
        os.close(self.fd)


class FaultSource(BlockSource):
    """Wraps a source: reads overlapping *fail* raise IntegrityError, reads
    overlapping *bug* raise RuntimeError (a bug, not a LazyfsError), and a read
    overlapping the block at ``gate[0]`` waits until one overlapping the block at
    ``gate[1]`` has started (so it completes only if reads run concurrently)."""

    def __init__(self, inner: BlockSource, fail=None, bug=None, gate=None) -> None:
        self.inner, self.fail, self.bug, self.gate = inner, fail, bug, gate
        self.size, self.read_only = inner.size, inner.read_only
        self.gate_open = trio.Event()
        self.gate_waiting = 0

    @property
    def flushes(self) -> int:
        return self.inner.flushes

    @staticmethod
    def _hits(rng, offset: int, length: int) -> bool:
        return rng is not None and offset < rng[0] + rng[1] and offset + length > rng[0]

    async def read(self, offset: int, length: int) -> bytes:
        if self._hits(self.fail, offset, length):
            raise IntegrityError(f"chunk at {self.fail[0]}", "blake3:aaaa", "blake3:bbbb", source="fuse_server")
        if self._hits(self.bug, offset, length):
            raise RuntimeError("injected bug")
        if self.gate is not None:
            if self._hits((self.gate[1], 4096), offset, length):
                self.gate_open.set()
            if self._hits((self.gate[0], 4096), offset, length):
                self.gate_waiting += 1
                try:
                    with trio.fail_after(60):  # never hang the test forever
                        await self.gate_open.wait()
                finally:
                    self.gate_waiting -= 1
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.inner.write(offset, data)

    async def flush(self) -> None:
        await self.inner.flush()


async def make_stack_source(kv: dict) -> BlockSource:
    from lazyfs.device.merged import MergedDevice
    from lazyfs.fetch.flatfile import FlatCache, LayerFlats
    from tests.support.layers import make_stack
    from tests.support.sources import CountingSource

    layers, backend, _ = make_stack(int(kv["stack"]), nlayers=int(kv.get("layers", 3)))
    dev = MergedDevice(layers, CountingSource(backend))
    cache = await FlatCache.load(kv["flat"], 1 << 30)
    dev.block_cache = await LayerFlats.open(cache, layers)
    inner_close = dev.aclose

    async def aclose() -> None:
        await inner_close()
        await cache.aclose()

    dev.aclose = aclose
    return dev


async def make_any_source(spec: str) -> tuple[str, BlockSource]:
    kv = dict(item.split("=", 1) for item in spec.split(","))
    if "stack" in kv:
        return kv["name"], await make_stack_source(kv)
    return make_source(spec)


def make_source(spec: str) -> tuple[str, BlockSource]:
    kv = dict(item.split("=", 1) for item in spec.split(","))
    ro = kv.get("ro") == "1"
    if "file" in kv:
        src: BlockSource = FileSource(kv["file"], read_only=ro)
    else:
        size = int(kv["size"])
        data = random.Random(int(kv["seed"])).randbytes(size) if "seed" in kv else size
        src = MemorySource(data, read_only=ro)
    faults = {k: tuple(int(x) for x in kv[k].split("+")) for k in ("fail", "bug", "gate") if k in kv}
    if faults:
        src = FaultSource(src, **faults)
    return kv["name"], src


async def handle(cmd: str, fs: ExportFS, mountpoint: str) -> object:
    word, _, arg = cmd.partition(" ")
    if word == "stats":
        st = fs.statistics()
        for name, exp in st["exports"].items():
            src = fs.source(name)
            if getattr(src, "block_cache", None) is not None:
                exp["store_gets"] = len(src.store.gets)
                exp["flat"] = src.block_cache.cache.statistics()
            exp["source_flushes"] = getattr(fs.source(name), "flushes", None)
            exp["gate_waiting"] = getattr(fs.source(name), "gate_waiting", 0)
        return st
    if word == "add":
        name, src = await make_any_source(arg)
        fs.add(name, src)
        return name
    if word == "remove":
        name, _, wait = arg.partition(" ")
        src = await fs.remove(name, wait=float(wait or 5))
        await src.aclose()
        return name
    if word == "attach":
        name, _, ro = arg.partition(" ")
        dev = await system.losetup_attach(os.path.join(mountpoint, name, IMAGE_NAME), read_only=ro == "ro")
        return {"dev": dev, "direct_io": system.loop_direct_io(dev)}
    if word == "detach":
        await system.losetup_detach(arg)
        return arg
    if word == "passthrough":
        name, _, path = arg.partition(" ")
        return {"passthrough": await fs.pass_through(name, path), "why_not": fs.passthrough_unavailable}
    if word == "loops":
        return await system.find_loop_devices(os.path.join(mountpoint, arg, IMAGE_NAME))
    raise ValueError(f"unknown command {cmd!r}")


def reply(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def control(fs: ExportFS, mountpoint: str, cancel: trio.CancelScope) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    async with stdin:
        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                cancel.cancel()  # the test went away: do not outlive it
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    result = await handle(line.decode().strip(), fs, mountpoint)
                except (LazyfsError, OSError, ValueError, KeyError) as exc:
                    reply(f"error {type(exc).__name__}: {exc}")
                else:
                    reply("ok " + json.dumps(result))


async def signals(cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async for _ in sigs:
            cancel.cancel()
            return


async def main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("mountpoint")
    p.add_argument("--export", action="append", default=[])
    args = p.parse_args(argv)
    fs = ExportFS(native_reads=os.environ.get("LAZYFS_FUSE_NATIVE", "1") != "0")
    for spec in args.export:
        fs.add(*await make_any_source(spec))
    threads = {"threads": int(os.environ["LAZYFS_FUSE_THREADS"])} if os.environ.get("LAZYFS_FUSE_THREADS") else {}

    async def serve_then_stop(task_status=trio.TASK_STATUS_IGNORED):
        await serve(args.mountpoint, fs, task_status=task_status, **threads)
        cancel.cancel()  # unmounted or aborted from outside: nothing left to do

    with trio.CancelScope() as cancel:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals, cancel)
            await nursery.start(serve_then_stop)
            reply("ready")
            nursery.start_soon(control, fs, args.mountpoint, cancel)
    for name in fs.names():  # not fs.remove: a loop device may still hold a handle
        await fs.source(name).aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(main, sys.argv[1:])
