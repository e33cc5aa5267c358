"""The FUSE codec and the export tree without a kernel: requests built as the kernel writes them."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest
import trio

from lazyfs.errors import FormatError, StorageError
from lazyfs.serve.fusekernel import protocol as p
from lazyfs.serve.fusekernel.exports import IMAGE_NAME, ExportFS, handle_id, parse_handle_id
from tests.support.memory import MemorySource


def out(iov) -> tuple[int, int, bytes]:
    """(error, unique, payload) of an answer's iovec, checking its length field."""
    raw = b"".join(bytes(part) for part in iov)
    length, error, unique = p.OUT_HEADER.unpack_from(raw)
    assert length == len(raw)
    return error, unique, raw[p.OUT_HEADER.size:]


def init_request(minor=44, flags=p.WANTED_FLAGS | p.INIT_EXT, flags2=(p.HAS_RESEND | p.PASSTHROUGH) >> 32):
    body = p.INIT_IN.pack(7, minor, 131072, flags & 0xFFFFFFFF) + struct.pack("<I", flags2) + bytes(44)
    return p.build_request(p.INIT, 2, body=body)


def test_init_negotiates_our_minor_and_flags():
    req = p.parse_request(init_request())
    assert req.args.flags & p.HAS_RESEND and req.args.minor == 44
    params, payload = p.negotiate(req.args)
    assert len(payload) == 64
    major, minor, readahead, flags, _bg, _ct, max_write, _tg, max_pages, _al, flags2, depth = p.INIT_OUT.unpack(payload)
    assert (major, minor, readahead, max_write, max_pages) == (7, p.OUR_MINOR, 131072, p.MAX_WRITE, 256)
    assert flags & p.INIT_EXT and flags & p.MAX_PAGES
    assert flags2 == p.PASSTHROUGH >> 32 and depth == p.PASSTHROUGH_STACK_DEPTH  # passthrough, nothing else of flags2
    assert params.has_resend and params.kernel_minor == 44 and params.passthrough
    assert p.SessionParams.from_json(params.to_json()) == params


def test_init_without_passthrough_in_the_kernel_asks_for_none():
    params, payload = p.negotiate(p.parse_request(init_request(flags2=p.HAS_RESEND >> 32)).args)
    *_, flags2, depth = p.INIT_OUT.unpack(payload)
    assert not params.passthrough and flags2 == 0 and depth == 0  # max_stack_depth only with passthrough
    no_ext = p.negotiate(p.Init(7, 44, 0, (p.WANTED_FLAGS | p.PASSTHROUGH) & ~p.INIT_EXT))[0]
    assert not no_ext.passthrough  # flags2 travel only with FUSE_INIT_EXT


def test_passthrough_open_and_ioctl_numbers():
    """linux/fuse.h: FOPEN_PASSTHROUGH is bit 7 with backing_id in open_out; the ioctls are
    _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t)."""
    fh, flags, backing_id = p.OPEN_OUT.unpack(p.open_out(9, no_flush=True, backing_id=3))
    assert (fh, flags, backing_id) == (9, 1 << 7 | 1 << 5, 3)
    assert p.OPEN_OUT.unpack(p.open_out(9, keep_cache=True)) == (9, p.FOPEN_KEEP_CACHE, 0)
    assert (p.IOC_BACKING_OPEN, p.IOC_BACKING_CLOSE) == (0x4010E501, 0x4004E502)
    assert p.backing_map(7) == (7).to_bytes(4, "little") + bytes(12)


@pytest.mark.parametrize("major,minor", [(8, 0), (7, 27)])
def test_init_refuses_other_protocols(major, minor):
    with pytest.raises(FormatError):
        p.negotiate(p.Init(major, minor, 0, 0))


def test_old_kernel_has_no_resend():
    params, _ = p.negotiate(p.Init(7, 38, 0, 0))
    assert params.minor == 38 and not params.has_resend


@pytest.mark.parametrize("text", ["", "{}", '{"minor": 99, "kernel_minor": 1, "flags": 0, "kernel_flags": 0, '
                                  '"max_readahead": 0, "max_write": 0}', "[1]"])
def test_damaged_session_params_are_one_clear_error(text):
    with pytest.raises(FormatError, match="FUSE session parameters"):
        p.SessionParams.from_json(text)


def test_requests_decode():
    r = p.parse_request(p.build_request(p.READ, 7 | p.UNIQUE_RESEND, 5, p.READ_IN.pack(9, 4096, 8192, 0, 0, 0, 0)))
    assert r.header.resent and r.args == p.Read(9, 4096, 8192) and r.header.nodeid == 5
    w = p.parse_request(p.build_request(p.WRITE, 8, 5, p.READ_IN.pack(9, 10, 3, 0, 0, 0, 0) + b"abc"))
    assert (w.args.fh, w.args.offset, bytes(w.args.data)) == (9, 10, b"abc")
    assert p.parse_request(p.build_request(p.LOOKUP, 9, 1, b"img\0")).args == p.Lookup(b"img")
    f = p.parse_request(p.build_request(p.BATCH_FORGET, 10, 0, p.BATCH_FORGET_IN.pack(2, 0)
                                        + p.FORGET_ONE.pack(3, 1) + p.FORGET_ONE.pack(4, 2)))
    assert f.args.items == ((3, 1), (4, 2))
    assert p.parse_request(p.build_request(p.FORGET, 11, 6, p.FORGET_IN.pack(5))).args.items == ((6, 5),)
    s = p.parse_request(p.build_request(p.SETATTR, 12, 3, p.SETATTR_IN.pack(
        p.FATTR_SIZE | p.FATTR_MTIME, 0, 0, 77, 0, 0, 5, 0, 0, 6, 0, 0, 0, 0, 0, 0)))
    assert (s.args.size, s.args.mtime_ns) == (77, 5_000_000_006)
    assert p.parse_request(p.build_request(p.FSYNC, 13, 3, p.FSYNC_IN.pack(9, 1, 0))).args == p.Fsync(9, True)
    assert p.parse_request(p.build_request(p.GETATTR, 14, 3, p.GETATTR_IN.pack(1, 0, 9))).args == p.GetAttr(9)
    assert isinstance(p.parse_request(p.build_request(99, 15)).args, p.Unknown)


@pytest.mark.parametrize("raw", [
    b"\0" * 10,  # shorter than a header
    p.build_request(p.STATFS, 1) + b"x",  # length field disagrees with the read
    p.build_request(p.READ, 1, 2, b"\0" * 8),  # argument too short
    p.build_request(p.WRITE, 1, 2, p.READ_IN.pack(9, 0, 100, 0, 0, 0, 0) + b"abc"),  # says 100, carries 3
    p.build_request(p.LOOKUP, 1, 1, b"no-nul"),
    p.build_request(p.BATCH_FORGET, 1, 0, p.BATCH_FORGET_IN.pack(1 << 30, 0)),  # a count that cannot fit
])
def test_malformed_messages_are_format_errors(raw):
    with pytest.raises(FormatError):
        p.parse_request(raw)


def test_notifications():
    error, unique, payload = out(p.notify_resend())
    assert (error, unique, payload) == (p.NOTIFY_RESEND, 0, b"")
    assert p.NOTIFY_RESEND == 7  # include/uapi/linux/fuse.h, enum fuse_notify_code (kernel >= 6.9)
    error, _, payload = out(p.notify_inval_entry(1, b"img"))
    assert error == p.NOTIFY_INVAL_ENTRY and payload == p.NOTIFY_INVAL_ENTRY_OUT.pack(1, 3, 0) + b"img\0"


def test_handle_ids_say_what_they_are():
    fh = handle_id(12345, 77, True)
    assert parse_handle_id(fh) == (77, True) and parse_handle_id(handle_id(1, 77, False)) == (77, False)


# -- the export tree ---------------------------------------------------------------------------------


class Kernel:
    """Speaks to an ExportFS the way the kernel would, one request at a time."""

    def __init__(self, fs: ExportFS) -> None:
        self.fs, self.unique = fs, 100

    async def __call__(self, opcode, nodeid=1, body=b""):
        self.unique += 2
        iov = await self.fs.handle(p.parse_request(p.build_request(opcode, self.unique, nodeid, body)))
        if iov is None:
            return None
        error, unique, payload = out(iov)
        assert unique == self.unique
        return -error if error else payload

    async def lookup(self, parent, name):
        reply = await self(p.LOOKUP, parent, name + b"\0")
        return reply if isinstance(reply, int) else p.ENTRY_OUT_HEAD.unpack_from(reply)[0]

    async def open(self, ino, flags):
        reply = await self(p.OPEN, ino, p.OPEN_IN.pack(flags, 0))
        return reply if isinstance(reply, int) else p.OPEN_OUT.unpack(reply)

    async def read(self, ino, fh, off, size):
        return await self(p.READ, ino, p.READ_IN.pack(fh, off, size, 0, 0, 0, 0))

    async def write(self, ino, fh, off, data):
        reply = await self(p.WRITE, ino, p.READ_IN.pack(fh, off, len(data), 0, 0, 0, 0) + data)
        return reply if isinstance(reply, int) else p.WRITE_OUT.unpack(reply)[0]


class FullDisk(MemorySource):
    async def write(self, offset, data):
        raise StorageError("writable root full", errno.ENOSPC)


def test_export_tree_answers_like_the_pyfuse3_front_end():
    async def main():
        fs = ExportFS()
        k = Kernel(fs)
        src = MemorySource(8192)
        fs.add("a", src)
        fs.add("ro", MemorySource(b"x" * 4096, read_only=True))
        fs.add("full", FullDisk(4096))
        d = await k.lookup(1, b"a")
        ino = await k.lookup(d, IMAGE_NAME.encode())
        assert await k.lookup(1, b"nope") == errno.ENOENT
        attr = p.ATTR.unpack_from(await k(p.GETATTR, ino, p.GETATTR_IN.pack(0, 0, 0)), p.ATTR_OUT_HEAD.size)
        assert attr[1] == 8192 and attr[9] == stat.S_IFREG | 0o600
        ro = await k.lookup(await k.lookup(1, b"ro"), IMAGE_NAME.encode())
        attr = p.ATTR.unpack_from(await k(p.GETATTR, ro, p.GETATTR_IN.pack(0, 0, 0)), p.ATTR_OUT_HEAD.size)
        assert attr[9] == stat.S_IFREG | 0o400
        assert await k.open(ro, os.O_RDWR) == errno.EROFS
        fh, flags, _ = await k.open(ro, os.O_RDONLY)
        assert flags & p.FOPEN_KEEP_CACHE
        fh, flags, _ = await k.open(ino, os.O_RDWR)
        assert not flags & p.FOPEN_KEEP_CACHE
        assert await k.write(ino, fh, 100, b"xyz") == 3
        assert await k.read(ino, fh, 99, 5) == b"\0xyz\0"
        assert await k.write(ino, fh, 8190, b"abcd") == 2  # short at the end, then ENOSPC
        assert await k.write(ino, fh, 8192, b"ab") == errno.ENOSPC
        assert await k(p.FSYNC, ino, p.FSYNC_IN.pack(fh, 0, 0)) == b"" and src.flushes == 1
        full = await k.lookup(await k.lookup(1, b"full"), IMAGE_NAME.encode())
        ffh, _, _ = await k.open(full, os.O_WRONLY)
        assert await k.write(full, ffh, 0, b"z") == errno.ENOSPC  # StorageError keeps its errno
        setattr_size = p.SETATTR_IN.pack(p.FATTR_SIZE, 0, 0, 4096, *[0] * 12)
        assert await k(p.SETATTR, ino, setattr_size) == errno.EPERM
        assert await k(p.SETATTR, ino, p.SETATTR_IN.pack(p.FATTR_MODE, *[0] * 15)) == errno.EPERM
        assert await k(9, 1, b"\0" * 8 + b"x\0") == errno.EPERM  # mkdir: the tree is the daemon's
        assert await k(22, ino, b"\0" * 8) == errno.ENOSYS  # getxattr: not counted as an error
        listing = await k(p.READDIR, 1, p.READ_IN.pack(1, 0, 4096, 0, 0, 0, 0))
        names, pos = [], 0
        while pos < len(listing):
            _ino, _off, namelen, _t = p.DIRENT_HEAD.unpack_from(listing, pos)
            names.append(listing[pos + 24: pos + 24 + namelen])
            pos += (24 + namelen + 7) & ~7
        assert names == [b"a", b"ro", b"full"]
        statfs = p.KSTATFS.unpack(await k(p.STATFS))
        assert statfs[0] == (8192 + 4096 + 4096) // 4096
        assert await k(p.FORGET, ino, p.FORGET_IN.pack(1)) is None
        assert await k(p.RELEASE, ino, p.RELEASE_IN.pack(fh, 0, 0, 0)) == b""
        assert await k.read(ino, fh, 0, 1) == errno.EBADF  # released
        st = fs.statistics()
        assert (st["reads"], st["writes"], st["bytes_written"], st["fsyncs"]) == (1, 2, 5, 1)
        assert st["errors"] == 7 and st["failures"] == 0

    trio.run(main)


def test_a_new_tree_adopts_the_handles_of_a_dead_daemon():
    """After a takeover the kernel still holds handles and inode numbers the previous daemon gave."""
    async def main():
        old = ExportFS()
        old.add("a", MemorySource(b"q" * 8192))
        k = Kernel(old)
        ino = await k.lookup(await k.lookup(1, b"a"), IMAGE_NAME.encode())
        fh, _, _ = await k.open(ino, os.O_RDWR)
        new = ExportFS(next_inode=old.next_inode)
        new.add("a", MemorySource(b"q" * 8192), inode=old.inode_of("a"))
        k2 = Kernel(new)
        assert await k2.read(ino, fh, 0, 2) == errno.EBADF  # not adopting: unknown handle
        new.adopt_handles = True
        assert await k2.read(ino, fh, 0, 2) == b"qq"
        assert new.statistics()["adopted_handles"] == 1 and new.statistics()["open_handles"] == 1
        assert await k2(p.RELEASE, ino, p.RELEASE_IN.pack(fh, 0, 0, 0)) == b""
        assert await k2(p.RELEASE, ino, p.RELEASE_IN.pack(fh, 0, 0, 0)) == b""  # a resent release is harmless
        assert new.statistics()["open_handles"] == 0
        ro_fh = handle_id(99, ino, True)
        new.add("b", MemorySource(4096, read_only=True))
        b_ino = new.inode_of("b") + 1
        assert await k2.read(b_ino, handle_id(5, b_ino, True), 0, 1) == errno.EBADF  # writable handle on read-only
        assert await k2.read(ino, ro_fh, 0, 1) == b"q"
        assert new.inode_of("b") >= old.next_inode  # inode numbers are never reused

    trio.run(main)


def test_resend_on_a_kernel_without_it_says_so_in_one_line(caplog):
    """Protocol 7.38 (kernel < 6.9): no RESEND is written, one warning says why, the takeover goes on."""
    from lazyfs.serve.fusekernel.session import Session

    r, w = os.pipe()
    try:
        params, _ = p.negotiate(p.Init(7, 38, 0, 0))
        session = Session(w, params, ExportFS(), "/mnt")
        with caplog.at_level("WARNING"):
            assert session.resend() is False
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "7.38 (< 7.40)" in lines[0] and "not replayed" in lines[0]
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 100)  # nothing was sent
        params, _ = p.negotiate(p.Init(7, 44, 0, 0))
        assert Session(w, params, ExportFS(), "/mnt").resend() is True
        assert os.read(r, 100) == b"".join(bytes(x) for x in p.notify_resend())
    finally:
        os.close(r)
        os.close(w)
