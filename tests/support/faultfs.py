"""A FUSE file system for power-loss tests: when the "power" is cut, only what was synced survives.

Run as a process (the FaultFs class below does it)::

    python -m tests.support.faultfs MOUNTPOINT

It prints ``ready`` once mounted and answers one JSON line per JSON command line
on stdin. Everything lives in memory. The model, per file and per directory:

* **File data.** A write lands in the "page cache" (what readers see) and marks
  its 4 KiB pages dirty. ``fsync``/``fdatasync`` copy the dirty pages and the
  size to the "disk". At a power cut each dirty page independently survives or
  not (so unsynced data vanishes or is torn at page granularity), and the size
  is either the synced one or the current one.
* **Names.** A create, mkdir, rename or unlink changes the directory at once and
  is queued as a pending operation of that directory. ``fsync`` of the
  directory makes its queue durable; ``fsync`` of a file makes durable the
  queue of the directory that created it, up to and including that creation
  (a journaling file system commits in order). At a power cut each directory
  keeps its durable entries plus a random prefix of its queue, so a
  create/rename/unlink not followed by one of those fsyncs may vanish.
* **A failed fsync** (``fail_fsyncs``) reports EIO and, as Linux does, marks
  the dirty pages clean without writing them: readers still see the data, a
  later fsync succeeds, and a power cut loses it ("fsyncgate").
* **Short writes** (``short_writes``): a write accepts at most N bytes.

Commands (``{"op": ...}``): ``reset`` (an empty, durable file system);
``arm`` ``after`` ``seed``: the power is cut when the ``after``-th mutating
request (write, truncate, create, mkdir, rename, unlink, rmdir, fsync,
fsyncdir) arrives: that request and every later one fail with EIO; ``cut``
``seed``: cut now; ``power_on``: the file system comes back as the disk holds
it (new inode numbers, so nothing the kernel cached from before is used);
``fail_fsyncs`` ``count`` ``after``: fail the
next ``count`` file fsyncs once ``after`` more have succeeded; ``short_writes`` ``max`` (0: off); ``status``.
Data is served with direct I/O and no attribute caching, so every access
reaches this process.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field

PAGE = 4096


@dataclass(eq=False)
class Node:
    ino: int
    is_dir: bool
    mode: int
    data: bytearray = field(default_factory=bytearray)  # files: the page cache
    disk: bytearray = field(default_factory=bytearray)  # files: what the disk holds
    dirty: set[int] = field(default_factory=set)  # files: pages written since the last sync
    size_dirty: bool = False
    entries: dict[bytes, int] = field(default_factory=dict)  # directories: names now
    disk_entries: dict[bytes, int] = field(default_factory=dict)  # directories: names on disk
    queue: list[tuple] = field(default_factory=list)  # directories: name operations not yet durable


def _apply(entries: dict[bytes, int], op: tuple) -> None:
    if op[0] == "link":
        entries[op[1]] = op[2]
    elif op[0] == "unlink":
        entries.pop(op[1], None)
    else:  # rename within one directory
        ino = entries.pop(op[1], None)
        if ino is not None:
            entries[op[2]] = ino


class Model:
    """The sans-FUSE core: a tree of Nodes with the durability rules above."""

    def __init__(self) -> None:
        self._numbers = itertools.count(2)  # never reused: a stale kernel inode never matches a new node
        self.reset()

    def reset(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.root = Node(1, True, stat.S_IFDIR | 0o755)
        self.nodes[1] = self.root
        self.parent_of: dict[int, int] = {}  # file inode -> directory that created it
        self.ops = 0
        self.cut_after: int | None = None
        self.seed = 0
        self.dead = False
        self.fail_fsyncs = 0  # how many fsyncs to fail ...
        self.fail_fsyncs_after = 0  # ... after letting this many succeed
        self.failed_fsyncs = 0
        self.max_write = 0

    # ------------------------------------------------------------ mutations

    def tick(self) -> None:
        """Count a mutating request; cut the power when armed for it. OSError(EIO) once dead."""
        if self.dead:
            raise OSError(errno.EIO, "power is off")
        self.ops += 1
        if self.cut_after is not None and self.ops >= self.cut_after:
            self.dead = True
            raise OSError(errno.EIO, "power cut")

    def new_node(self, parent: Node, name: bytes, is_dir: bool, mode: int) -> Node:
        if name in parent.entries:
            raise OSError(errno.EEXIST, "exists")
        node = Node(next(self._numbers), is_dir, (stat.S_IFDIR if is_dir else stat.S_IFREG) | (mode & 0o7777))
        self.nodes[node.ino] = node
        parent.entries[name] = node.ino
        parent.queue.append(("link", name, node.ino))
        self.parent_of[node.ino] = parent.ino
        return node

    def remove(self, parent: Node, name: bytes, want_dir: bool) -> None:
        ino = parent.entries.get(name)
        if ino is None:
            raise OSError(errno.ENOENT, "no such entry")
        node = self.nodes[ino]
        if want_dir and not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if not want_dir and node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if want_dir and node.entries:
            raise OSError(errno.ENOTEMPTY, "not empty")
        del parent.entries[name]
        parent.queue.append(("unlink", name))

    def rename(self, old_parent: Node, old: bytes, new_parent: Node, new: bytes) -> None:
        ino = old_parent.entries.get(old)
        if ino is None:
            raise OSError(errno.ENOENT, "no such entry")
        target = new_parent.entries.get(new)
        if target is not None and self.nodes[target].is_dir and self.nodes[target].entries:
            raise OSError(errno.ENOTEMPTY, "not empty")
        if old_parent is new_parent:
            del old_parent.entries[old]
            old_parent.entries[new] = ino
            old_parent.queue.append(("rename", old, new))
        else:
            del old_parent.entries[old]
            old_parent.queue.append(("unlink", old))
            new_parent.entries[new] = ino
            new_parent.queue.append(("link", new, ino))
            self.parent_of[ino] = new_parent.ino

    def write(self, node: Node, offset: int, buf: bytes) -> int:
        if self.max_write:
            buf = buf[: self.max_write]
        end = offset + len(buf)
        if end > len(node.data):
            node.data.extend(bytes(end - len(node.data)))
            node.size_dirty = True
        node.data[offset:end] = buf
        node.dirty.update(range(offset // PAGE, (end + PAGE - 1) // PAGE))
        return len(buf)

    def truncate(self, node: Node, size: int) -> None:
        old = len(node.data)
        if size < old:
            del node.data[size:]
        else:
            node.data.extend(bytes(size - old))
        node.dirty.update(range(min(old, size) // PAGE, (max(old, size) + PAGE - 1) // PAGE))
        node.size_dirty = True

    def fsync_file(self, node: Node) -> None:
        if self.fail_fsyncs and self.fail_fsyncs_after:
            self.fail_fsyncs_after -= 1
        elif self.fail_fsyncs:
            self.fail_fsyncs -= 1
            self.failed_fsyncs += 1
            node.dirty.clear()  # written back "in vain": clean in the cache, not on the disk
            node.size_dirty = False
            raise OSError(errno.EIO, "injected fsync failure")
        if len(node.disk) != len(node.data):
            if len(node.disk) > len(node.data):
                del node.disk[len(node.data):]
            else:
                node.disk.extend(bytes(len(node.data) - len(node.disk)))
        for page in node.dirty:
            node.disk[page * PAGE : (page + 1) * PAGE] = node.data[page * PAGE : (page + 1) * PAGE]
        node.dirty.clear()
        node.size_dirty = False
        parent = self.nodes.get(self.parent_of.get(node.ino, -1))
        if parent is not None:  # the creation of the file is committed with it
            last = max((i for i, op in enumerate(parent.queue) if op[0] == "link" and op[2] == node.ino), default=-1)
            self._commit(parent, last + 1)

    def fsync_dir(self, node: Node) -> None:
        self._commit(node, len(node.queue))

    def _commit(self, node: Node, upto: int) -> None:
        for op in node.queue[:upto]:
            _apply(node.disk_entries, op)
        del node.queue[:upto]

    # ------------------------------------------------------------ power

    def power_on(self) -> None:
        """Replace the tree by what the disk holds after the cut (seeded by ``self.seed``)."""
        rng = random.Random(self.seed)
        renumber: dict[int, Node] = {}

        def restore(old: Node) -> Node:
            if old.ino in renumber:
                return renumber[old.ino]
            node = Node(1 if old is self.root else next(self._numbers), old.is_dir, old.mode)
            renumber[old.ino] = node
            if old.is_dir:
                entries = dict(old.disk_entries)
                for op in old.queue[: rng.randint(0, len(old.queue))]:
                    _apply(entries, op)
                for name, ino in sorted(entries.items()):
                    if ino in self.nodes:
                        child = restore(self.nodes[ino])
                        node.entries[name] = child.ino
                        if not child.is_dir:
                            parents[child.ino] = node.ino
                node.disk_entries = dict(node.entries)
            else:
                # an unsynced size change may or may not have reached the disk
                sizes = [len(old.disk), len(old.data)]
                size = rng.choice(sizes) if old.size_dirty or sizes[0] != sizes[1] else sizes[0]
                content = bytearray(old.disk[:size]) + bytes(max(0, size - len(old.disk)))
                for page in sorted(old.dirty):  # each unsynced page survives, or not
                    if page * PAGE < size and rng.random() < 0.5:
                        piece = old.data[page * PAGE : (page + 1) * PAGE]
                        piece += bytes(PAGE - len(piece))
                        end = min(size, (page + 1) * PAGE)
                        content[page * PAGE : end] = piece[: end - page * PAGE]
                node.data, node.disk = content, bytearray(content)
            return node

        parents: dict[int, int] = {}
        root = restore(self.root)
        self.nodes = {n.ino: n for n in renumber.values()}
        self.root, self.parent_of = root, parents
        self.dead, self.cut_after = False, None


# ---------------------------------------------------------------- the FUSE shell


def _serve(mountpoint: str) -> None:
    import pyfuse3
    import trio

    model = Model()
    handles: dict[int, Node] = {}
    dir_handles: dict[int, tuple[Node, list[tuple[bytes, int]]]] = {}
    fhs = itertools.count(1)

    def fail(exc: OSError):
        return pyfuse3.FUSEError(exc.errno or errno.EIO)

    def node_of(ino: int) -> Node:
        if model.dead:
            raise pyfuse3.FUSEError(errno.EIO)
        node = model.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def attr(node: Node) -> "pyfuse3.EntryAttributes":
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = node.mode
        a.st_nlink = 2 if node.is_dir else 1
        a.st_uid = a.st_gid = 0
        a.st_size = 0 if node.is_dir else len(node.data)
        a.st_blksize = PAGE
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time.time_ns()
        return a

    def mutate(fn, *args):
        try:
            model.tick()
            return fn(*args)
        except OSError as exc:
            raise fail(exc) from None

    class Ops(pyfuse3.Operations):
        enable_writeback_cache = False

        async def lookup(self, parent_inode, name, ctx=None):
            parent = node_of(parent_inode)
            ino = parent.entries.get(name)
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attr(model.nodes[ino])

        async def getattr(self, inode, ctx=None):
            return attr(node_of(inode))

        async def setattr(self, inode, a, fields, fh, ctx):
            node = node_of(inode)
            if fields.update_size:
                mutate(model.truncate, node, a.st_size)
            if fields.update_mode:
                node.mode = (node.mode & ~0o7777) | (a.st_mode & 0o7777)
            return attr(node)

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = PAGE
            used = sum(len(n.data) for n in model.nodes.values()) // PAGE
            s.f_blocks = 1 << 22
            s.f_bfree = s.f_bavail = (1 << 22) - used
            s.f_files, s.f_ffree, s.f_favail = 1 << 20, (1 << 20) - len(model.nodes), (1 << 20) - len(model.nodes)
            s.f_namemax = 255
            return s

        async def mkdir(self, parent_inode, name, mode, ctx):
            return attr(mutate(model.new_node, node_of(parent_inode), name, True, mode))

        async def create(self, parent_inode, name, mode, flags, ctx):
            node = mutate(model.new_node, node_of(parent_inode), name, False, mode)
            fh = next(fhs)
            handles[fh] = node
            return pyfuse3.FileInfo(fh=fh, direct_io=True), attr(node)

        async def unlink(self, parent_inode, name, ctx):
            mutate(model.remove, node_of(parent_inode), name, False)

        async def rmdir(self, parent_inode, name, ctx):
            mutate(model.remove, node_of(parent_inode), name, True)

        async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
            if flags:
                raise pyfuse3.FUSEError(errno.EINVAL)
            mutate(model.rename, node_of(parent_inode_old), name_old, node_of(parent_inode_new), name_new)

        async def open(self, inode, flags, ctx):
            node = node_of(inode)
            if node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            fh = next(fhs)
            handles[fh] = node
            return pyfuse3.FileInfo(fh=fh, direct_io=True)

        def _file(self, fh) -> Node:
            node = handles.get(fh)
            if node is None or model.dead or model.nodes.get(node.ino) is not node:
                raise pyfuse3.FUSEError(errno.EIO)  # opened before the power cut
            return node

        async def read(self, fh, off, size):
            node = self._file(fh)
            return bytes(node.data[off : off + size])

        async def write(self, fh, off, buf):
            node = self._file(fh)
            return mutate(model.write, node, off, buf)

        async def flush(self, fh):
            if model.dead:
                raise pyfuse3.FUSEError(errno.EIO)

        async def fsync(self, fh, datasync):
            node = self._file(fh)
            mutate(model.fsync_file, node)

        async def release(self, fh):
            handles.pop(fh, None)

        async def opendir(self, inode, ctx):
            node = node_of(inode)
            if not node.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            fh = next(fhs)
            dir_handles[fh] = (node, sorted(node.entries.items()))
            return fh

        async def readdir(self, fh, start_id, token):
            if model.dead or fh not in dir_handles:
                raise pyfuse3.FUSEError(errno.EIO)
            _, entries = dir_handles[fh]
            for i in range(start_id, len(entries)):
                name, ino = entries[i]
                node = model.nodes.get(ino)
                if node is not None and not pyfuse3.readdir_reply(token, name, attr(node), i + 1):
                    break

        async def fsyncdir(self, fh, datasync):
            if model.dead or fh not in dir_handles:
                raise pyfuse3.FUSEError(errno.EIO)
            node = dir_handles[fh][0]
            if model.nodes.get(node.ino) is not node:
                raise pyfuse3.FUSEError(errno.EIO)
            mutate(model.fsync_dir, node)

        async def releasedir(self, fh):
            dir_handles.pop(fh, None)

        async def forget(self, inode_list):
            pass  # nodes live until reset or power_on

    def command(doc: dict) -> dict:
        op = doc.get("op")
        if op == "reset":
            model.reset()
            handles.clear()
            dir_handles.clear()
        elif op == "arm":
            model.cut_after, model.seed = model.ops + int(doc["after"]), int(doc.get("seed", 0))
        elif op == "cut":
            model.dead, model.seed = True, int(doc.get("seed", 0))
        elif op == "power_on":
            if not model.dead:
                raise ValueError("the power is on")
            model.power_on()
            handles.clear()
            dir_handles.clear()
        elif op == "fail_fsyncs":
            model.fail_fsyncs, model.fail_fsyncs_after = int(doc["count"]), int(doc.get("after", 0))
        elif op == "short_writes":
            model.max_write = int(doc["max"])
        elif op != "status":
            raise ValueError(f"unknown command {op!r}")
        return {"ops": model.ops, "dead": model.dead, "failed_fsyncs": model.failed_fsyncs}

    async def control(nursery) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        while True:
            data = await stdin.receive_some(65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    reply = {"ok": command(json.loads(line))}
                except (ValueError, KeyError) as exc:
                    reply = {"error": str(exc)}
                os.write(1, json.dumps(reply).encode() + b"\n")
        nursery.cancel_scope.cancel()

    async def main() -> None:
        pyfuse3.init(Ops(), mountpoint, {"fsname=faultfs", "subtype=faultfs"})
        try:
            os.write(1, b"ready\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(control, nursery)
                nursery.start_soon(pyfuse3.main)
        finally:
            pyfuse3.close(unmount=True)

    trio.run(main)


# ---------------------------------------------------------------- the test side


class FaultFs:
    """A running fault file system at *mountpoint* (a context manager; unmounts on exit)."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = str(mountpoint)
        os.makedirs(self.mountpoint, exist_ok=True)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.faultfs", self.mountpoint], cwd=root,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if line != b"ready\n":
            self.close()
            raise RuntimeError(f"fault file system did not start: {line!r}")

    def _call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def reset(self) -> dict:
        return self._call("reset")

    def arm(self, after: int, seed: int) -> dict:
        return self._call("arm", after=after, seed=seed)

    def cut(self, seed: int) -> dict:
        return self._call("cut", seed=seed)

    def power_on(self) -> dict:
        return self._call("power_on")

    def fail_fsyncs(self, count: int, after: int = 0) -> dict:
        return self._call("fail_fsyncs", count=count, after=after)

    def short_writes(self, max_bytes: int) -> dict:
        return self._call("short_writes", max=max_bytes)

    def status(self) -> dict:
        return self._call("status")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)  # only if it is still mounted

    def __enter__(self) -> "FaultFs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
