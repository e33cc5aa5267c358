"""Bounds on what a tar layer sends: strict pax numbers, bounded headers and sparse maps, a decompressed limit.

The scans run on files (no root needed); the convert runs at the end go
through the CLI as users do, with the real working filesystem (root, loop).
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tracemalloc
import zlib

import pytest

from lazyfs.errors import FormatError
from lazyfs.image import tarapply
from lazyfs.image.tarapply import MAX_EXTENDED_HEADER, MAX_SPARSE_REGIONS, scan_layer
from lazyfs.format.oci import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST, canonical_json
from lazyfs.image.layout import OciLayout
from tests.support.ociimages import write_image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pax_tar(pax: dict[str, str], name: str = "f", data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.pax_headers = pax
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def header(name: bytes, size: int, typeflag: bytes, *, size_field: bytes | None = None, extra: bytes = b"") -> bytes:
    """One 512-byte ustar header (checksum right), the size as octal (or *size_field* as it is)."""
    fields = bytearray(512)
    fields[0:len(name)] = name
    fields[100:108] = b"0000644\0"
    fields[108:116] = b"0000000\0"
    fields[116:124] = b"0000000\0"
    fields[124:136] = size_field if size_field is not None else b"%011o\0" % size
    fields[136:148] = b"00000000000\0"
    fields[156:157] = typeflag
    fields[257:263] = b"ustar\0"
    fields[263:265] = b"00"
    fields[386:386 + len(extra)] = extra
    fields[148:156] = b" " * 8
    fields[148:156] = b"%06o\0 " % sum(fields)
    return bytes(fields)


def scan(tmp_path, data: bytes, compression: str = "none", **kwargs):
    path = tmp_path / "layer"
    path.write_bytes(data)
    return scan_layer(str(path), compression, "layer 0 of test", **kwargs)


def refused(tmp_path, data: bytes, compression: str = "none", **kwargs) -> tuple[str, int]:
    """The one line a scan of *data* fails with, and the peak memory it took."""
    tracemalloc.start()
    try:
        with pytest.raises(FormatError) as caught:
            scan(tmp_path, data, compression, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(caught.value)
    assert text.startswith("layer 0 of test:") and "\n" not in text, text
    return text, peak


def test_tarfile_still_has_the_hooks_we_bound():
    for hook in ("_proc_member", "_proc_sparse", "_proc_gnusparse_01", "_proc_gnusparse_10"):
        assert callable(getattr(tarfile.TarInfo, hook, None)), hook
    assert callable(getattr(tarfile, "nti", None))


@pytest.mark.parametrize("key, value", [
    ("mtime", "Infinity"), ("mtime", "-inf"), ("mtime", "nan"), ("mtime", "1e400"), ("mtime", " 12"),
    ("atime", "1_000"), ("size", "²"), ("size", "٣"), ("uid", "1_0"), ("gid", "+5"), ("mtime", "99999999999999"),
])
def test_pax_numbers_are_parsed_strictly(tmp_path, key, value):
    text, _ = refused(tmp_path, pax_tar({key: value}))
    assert f"pax {key}" in text and "'f'" in text


def test_valid_pax_times_keep_their_nanoseconds(tmp_path):
    from lazyfs.image.tarapply import _open_tar, entry_from_tarinfo, members

    with _open_tar(io.BytesIO(pax_tar({"mtime": "1700000000.123456789", "atime": "-1.5"}))) as tf:
        (entry,) = [entry_from_tarinfo(ti) for ti in members(tf, "t")]
    assert entry.mtime_ns == 1_700_000_000_123_456_789 and entry.atime_ns == -1_500_000_000


def test_an_extended_header_claiming_8_gib_is_refused_before_it_is_read(tmp_path):
    data = header(b"././@PaxHeader", 0, b"x", size_field=b"77777777777\0") + bytes(1024)
    text, peak = refused(tmp_path, data)
    assert "extended header of 8589934591 bytes" in text and peak < 4 << 20
    data = header(b"././@LongLink", MAX_EXTENDED_HEADER + 1, b"L") + bytes(1024)
    assert "extended header" in refused(tmp_path, data)[0]


def pax_record(key: bytes, value: bytes) -> bytes:
    """``"<length> key=value\\n"``, the length counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def test_global_pax_headers_cannot_pile_up(tmp_path):
    out = io.BytesIO()
    for i in range(3):  # each under the per-header limit, together over it
        body = pax_record(b"k%d" % i, b"v" * 400_000)
        out.write(header(b"pax_global_header", len(body), b"g"))
        out.write(body + bytes(-len(body) % 512))
    out.write(header(b"f", 0, b"0") + bytes(1024))
    assert "global pax headers of more than" in refused(tmp_path, out.getvalue())[0]


def sparse10(map_lines: list[bytes], realsize: int = 1 << 20) -> bytes:
    body = b"".join(line + b"\n" for line in map_lines)
    body += bytes(-len(body) % 512)
    return pax_tar({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
                    "GNU.sparse.realsize": str(realsize)}, "GNUSparseFile.0/s", body)


def test_gnu_sparse_maps_are_bounded_and_strict(tmp_path):
    assert "regions (at most" in refused(tmp_path, sparse10([b"%d" % (1 << 40)]))[0]
    short = refused(tmp_path, sparse10([b"3", b"0", b"512"]))[0]  # three regions promised, one given
    assert "cut short" in short or "longer than" in short
    assert "GNU sparse map" in refused(tmp_path, sparse10([b"1", "٣".encode(), b"512"]))[0]
    assert "GNU.sparse.map" in refused(tmp_path, pax_tar({"GNU.sparse.map": "0,a", "GNU.sparse.size": "5"}))[0]
    # endless map lines compress to nothing: refused at the count, within a few blocks
    endless = sparse10([b"%d" % (MAX_SPARSE_REGIONS + 1)] + [b"0"] * (2 * MAX_SPARSE_REGIONS + 2))
    text, peak = refused(tmp_path, gzip.compress(endless), "gzip")
    assert peak < 16 << 20, peak


def old_gnu_sparse(blocks: int) -> bytes:
    """An old GNU sparse member ('S') followed by *blocks* extension blocks, each of 21 regions."""
    extra = bytearray(386 - 386 + 512 - 386)
    extra[482 - 386] = 1  # isextended
    extra[483 - 386:495 - 386] = b"%011o\0" % (1 << 20)  # realsize
    out = bytearray(header(b"s", 0, b"S", extra=bytes(extra)))
    for i in range(blocks):
        block = bytearray(512)
        for j in range(21):
            block[j * 24:j * 24 + 24] = b"%011o\0%011o\0" % ((i * 21 + j) * 1024 + 1, 512)
        block[504] = 1
        out += block
    return bytes(out) + bytes(1024)


def test_old_gnu_sparse_extensions_are_bounded(tmp_path):
    text, peak = refused(tmp_path, gzip.compress(old_gnu_sparse(MAX_SPARSE_REGIONS // 21 + 10)), "gzip")
    assert "sparse" in text and peak < 32 << 20


def test_real_sparse_files_still_parse(tmp_path):
    """GNU tar's sparse formats give the regions tarfile itself would give."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.img", "wb") as f:
        f.truncate(8 << 20)
        for offset in (0, 3 << 20, (8 << 20) - 4096):
            f.seek(offset)
            f.write(b"x" * 4096)
    for fmt in ("posix", "gnu"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", "--create", "--file", str(out), "--directory", str(src), f"--format={fmt}",
                        "--sparse", "sparse.img"], check=True)
        data = out.read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
            stock = [(ti.name, ti.size, ti.sparse) for ti in tf]
        from lazyfs.image.tarapply import _open_tar, members

        with _open_tar(io.BytesIO(data)) as tf:
            ours = [(ti.name, ti.size, ti.sparse) for ti in members(tf, "t")]
        assert ours == stock and ours[0][2], (fmt, ours)
        assert scan(tmp_path, data).stats.entries == 1


def test_members_are_not_kept_and_their_number_is_bounded(tmp_path, monkeypatch):
    many = io.BytesIO()
    with tarfile.open(fileobj=many, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(20_000):
            tf.addfile(tarfile.TarInfo(f"d/{i:08d}"))
    data = many.getvalue()
    tracemalloc.start()
    try:
        scan(tmp_path, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # tarfile alone keeps every TarInfo: about 20 MB here
    monkeypatch.setattr(tarapply, "MAX_LAYER_ENTRIES", 1000)
    assert "more than 1000 tar entries" in refused(tmp_path, data)[0]


def gzip_bomb(path, total: int) -> str:
    """A gzip of a tar holding one file of *total* zero bytes; the tar's sha256 (its diff ID)."""
    sha = hashlib.sha256()
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    with open(path, "wb") as f:
        def put(data: bytes) -> None:
            sha.update(data)
            f.write(comp.compress(data))

        put(header(b"zeros", total, b"0"))
        for _ in range(total >> 20):
            put(zero)
        put(bytes(1024))
        f.write(comp.flush())
    return "sha256:" + sha.hexdigest()


def test_a_gzip_bomb_stops_at_the_limit(tmp_path):
    bomb = tmp_path / "bomb.gz"
    gzip_bomb(bomb, 256 << 20)
    assert bomb.stat().st_size < 1 << 20
    spool = tmp_path / "spool.tar"
    text, peak = refused(tmp_path, bomb.read_bytes(), "gzip", spool=str(spool), limit=32 << 20)
    assert "more than 33554432 bytes decompressed" in text and "convert_max_layer_bytes" in text
    assert spool.stat().st_size <= 32 << 20 and peak < 8 << 20


# ---------------------------------------------------------------- through lazyfs convert


# A small process that runs the command and reports the peak RSS wait4() gives for it: measured
# from the test process itself, a fork would count the test's own pages until the exec.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv: list[str], tmp_path, timeout: float = 600) -> tuple[int, str, int]:
    """Run *argv*; ``(exit status, stderr, peak RSS in bytes of that process)``."""
    rss = tmp_path / "rss"
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(rss), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    return proc.returncode, proc.stderr, int(rss.read_text())


def convert(tmp_path, layout: str, **config) -> tuple[int, str, int]:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"cache_root": str(tmp_path / "cache"), "run_dir": str(tmp_path / "run"),
                               "state_dir": str(tmp_path / "state"), **config}))
    return run_measured([sys.executable, "-m", "lazyfs.cli", "convert", f"oci:{layout}:x", f"oci:{tmp_path}/out:x",
                         "--quiet", "--config", str(cfg)], tmp_path)


@pytest.mark.loop
def test_convert_refuses_a_gzip_bomb_layer(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("convert needs root")
    layout = tmp_path / "layout"
    diff_id = gzip_bomb(tmp_path / "bomb.gz", 512 << 20)  # 512 MiB of tar in well under 1 MiB of gzip
    store = OciLayout(str(layout)).ensure()
    blob = store.put_bytes((tmp_path / "bomb.gz").read_bytes(), "application/vnd.oci.image.layer.v1.tar+gzip")
    config = store.put_bytes(canonical_json({"architecture": "amd64", "os": "linux", "config": {},
                                             "rootfs": {"type": "layers", "diff_ids": [diff_id]}}), MEDIA_TYPE_CONFIG)
    store.put_manifest(canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST,
                                       "config": config.to_json(), "layers": [blob.to_json()]}), "x")
    status, stderr, rss = convert(tmp_path, str(layout), convert_max_layer_bytes=64 << 20)
    assert status == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "more than 67108864 bytes decompressed" in lines[0] and "layer 0" in lines[0]
    assert rss < 300 << 20, rss
    leftover = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "cache") for f in fs)
    assert leftover < 1 << 20, leftover  # no spool left behind


@pytest.mark.loop
def test_convert_refuses_pax_infinity(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("convert needs root")
    tar = tmp_path / "inf.tar"
    tar.write_bytes(pax_tar({"mtime": "Infinity"}, "etc/evil"))
    write_image(str(tmp_path / "layout"), "x", [str(tar)])
    status, stderr, _ = convert(tmp_path, str(tmp_path / "layout"))
    assert status == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "'etc/evil'" in lines[0] and "pax mtime" in lines[0] and "Infinity" in lines[0]
