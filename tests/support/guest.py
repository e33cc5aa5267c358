"""Boot a throwaway qemu guest to run a shell script against disks and shared directories.

The guest is Debian's own kernel (booted as an uncompressed ELF ``vmlinux`` through its PVH
entry point, which skips the real-mode setup and decompressor) and a tiny busybox initramfs
that loads the virtio/ext4/virtiofs modules it needs, runs the caller's script and powers off.
Under TCG (no KVM) a boot to the script takes a few seconds.

The serial console carries everything. ``/init`` frames the script's output with
``LAZYFS-GUEST-BEGIN`` and ``LAZYFS-GUEST-END rc=N`` lines so :func:`boot` can hand back the
script's own output and exit status, separated from kernel noise.

Artefacts (vmlinux, initrds) are cached under :func:`cache_dir`, keyed by everything they are
built from, and written atomically so concurrent test processes can share the cache.

Pure parts (payload detection, modules.dep, newc cpio, marker parsing) take and return bytes or
strings; the I/O shells around them are small.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyfs.durable import write_atomically
from lazyfs.errors import FormatError, LazyfsError, NotFoundError

QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/bin/virtiofsd")

BEGIN_MARKER = "LAZYFS-GUEST-BEGIN"
END_MARKER = "LAZYFS-GUEST-END"

#: virtio-blk disks holding ext4. crc32c_generic is listed by hand: ext4 only names it as a
#: softdep ("crc32c" through the crypto API), and without it metadata_csum volumes do not mount.
BLOCK_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
#: virtio-fs shares (vhost-user-fs-pci).
VIRTIOFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtiofs")
#: Both of the above.
DEFAULT_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "virtiofs")

# Bump when the initrd layout or /init changes, so stale cache entries are not reused.
_INITRD_FORMAT = 2


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Kernel:
    """An installed kernel: its version, compressed image and modules directory."""

    version: str
    vmlinuz: Path
    modules_dir: Path


@dataclass(frozen=True, slots=True)
class Drive:
    """A raw disk image attached as a virtio-blk device (/dev/vda, vdb, ... in order)."""

    path: Path
    read_only: bool = False
    format: str = "raw"


@dataclass(frozen=True, slots=True)
class Share:
    """A host directory exported over virtio-fs under *tag* (guest: ``mount -t virtiofs TAG``)."""

    directory: Path
    tag: str = "lazyfs"


@dataclass(frozen=True, slots=True)
class GuestResult:
    """What a boot produced.

    ``output`` is the script's output (between the markers; "" if the script never started),
    ``returncode`` its exit status, or None if the guest never reported one (panic, timeout).
    ``console`` is the whole serial log, ``seconds`` the wall time from qemu start to exit.
    """

    output: str
    returncode: int | None
    seconds: float
    console: str = ""
    timed_out: bool = False
    qemu_returncode: int | None = None
    virtiofsd_log: str = ""

    def check(self) -> GuestResult:
        """Return self if the script exited 0; raise GuestError with the console otherwise."""
        if self.returncode != 0:
            raise GuestError(self)
        return self


class GuestError(LazyfsError):
    """The guest script failed or never finished; carries the :class:`GuestResult`."""

    def __init__(self, result: GuestResult) -> None:
        self.result = result
        why = "timed out" if result.timed_out else f"returned {result.returncode}"
        tail = "\n".join(result.console.splitlines()[-40:])
        daemon = f"\nvirtiofsd:\n{result.virtiofsd_log}" if result.virtiofsd_log else ""
        super().__init__(f"guest script {why} after {result.seconds:.1f}s; console tail:\n{tail}{daemon}")


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where built artefacts live: $LAZYFS_TEST_CACHE, else $XDG_CACHE_HOME/lazyfs-test."""
    explicit = os.environ.get("LAZYFS_TEST_CACHE")
    if explicit:
        base = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = Path(xdg) / "lazyfs-test"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------- kernel


def _version_key(version: str) -> tuple:
    # "6.1.0-56-amd64" sorts numerically part by part; text parts compare as text.
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.-]", version))


def find_kernel(boot_dir: str | Path = "/boot", modules_root: str | Path = "/lib/modules") -> Kernel:
    """The newest ``vmlinuz-*`` under *boot_dir* that has a modules directory.

    Raises NotFoundError if there is none (install linux-image-amd64).
    """
    boot_dir, modules_root = Path(boot_dir), Path(modules_root)
    found = []
    for image in boot_dir.glob("vmlinuz-*"):
        version = image.name[len("vmlinuz-") :]
        modules = modules_root / version
        if (modules / "modules.dep").is_file():
            found.append(Kernel(version, image, modules))
    if not found:
        raise NotFoundError(
            f"no kernel with modules under {boot_dir} and {modules_root} (apt-get install linux-image-amd64)"
        )
    return max(found, key=lambda k: _version_key(k.version))


_ELF_MAGIC = b"\x7fELF"

# Magic numbers of the kernel payload compressors, as the kernel's build writes them.
_PAYLOAD_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("lz4", b"\x02\x21\x4c\x18"),
)


def payload_candidates(image: bytes) -> list[tuple[str, int]]:
    """Where a compressed vmlinux may start inside a bzImage: (compression, offset) pairs.

    The boot header's payload_offset (protocol >= 2.08) comes first; then every offset where a
    known compression magic occurs, in file order, for images whose header cannot be trusted.
    """
    out: list[tuple[str, int]] = []
    if len(image) >= 0x250 and image[0x202:0x206] == b"HdrS":
        (proto,) = struct.unpack_from("<H", image, 0x206)
        if proto >= 0x208:
            setup_bytes = ((image[0x1F1] or 4) + 1) * 512
            (payload_offset,) = struct.unpack_from("<I", image, 0x248)
            start = setup_bytes + payload_offset
            for kind, magic in _PAYLOAD_MAGICS:
                if image[start : start + len(magic)] == magic:
                    out.append((kind, start))
                    break
    hits = []
    for kind, magic in _PAYLOAD_MAGICS:
        pos = image.find(magic)
        while pos != -1:
            hits.append((pos, kind))
            pos = image.find(magic, pos + 1)
    out.extend((kind, pos) for pos, kind in sorted(hits) if (kind, pos) not in out)
    return out


def _decompress(kind: str, data: bytes) -> bytes:
    """Decompress one stream of *kind* from the start of *data*, ignoring trailing bytes."""
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise FormatError(f"kernel payload compressed with {kind}, which this helper cannot decompress")


def decompress_vmlinux(image: bytes) -> bytes:
    """The uncompressed ELF vmlinux inside a bzImage (pure). Raises FormatError if none is found."""
    tried = []
    for kind, offset in payload_candidates(image):
        try:
            raw = _decompress(kind, image[offset:])
        except Exception as exc:  # each decompressor has its own error type (ZstdError, LZMAError, ...)
            tried.append(f"{kind}@{offset}: {exc}")
            continue
        if raw[:4] == _ELF_MAGIC:
            return raw
        tried.append(f"{kind}@{offset}: not ELF")
    raise FormatError(f"no ELF vmlinux found in kernel image (tried {'; '.join(tried[:8]) or 'nothing'})")


def extract_vmlinux(vmlinuz: str | Path, out: str | Path | None = None) -> Path:
    """Write the uncompressed ELF vmlinux of *vmlinuz* to *out* (default: cached) and return it.

    A cached copy keyed by the image's path, size and mtime is reused.
    """
    vmlinuz = Path(vmlinuz)
    key = hashlib.sha256(_file_fingerprint(vmlinuz).encode()).hexdigest()[:16]
    cached = cache_dir() / f"vmlinux-{vmlinuz.name.removeprefix('vmlinuz-')}-{key}"
    if not cached.is_file():
        _write_atomic(cached, decompress_vmlinux(vmlinuz.read_bytes()))
    if out is None:
        return cached
    out = Path(out)
    if out.resolve() != cached.resolve():
        _write_atomic(out, cached.read_bytes())
    return out


# --------------------------------------------------------------------------- modules


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", name)
    return name.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse modules.dep: module name -> (its path, paths of the modules it needs)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if ":" not in line:
            raise FormatError(f"modules.dep line {lineno}: no ':' in {line!r}")
        path, _, deps = line.partition(":")
        out[_module_name(path)] = (path.strip(), deps.split())
    return out


def resolve_modules(
    deps: Mapping[str, tuple[str, list[str]]], wanted: Iterable[str], builtin: Iterable[str] = ()
) -> list[str]:
    """Module paths to load, each after everything it depends on (pure).

    Names in *builtin* (or whose path is built in) are skipped. Raises NotFoundError for a name
    that is neither a module nor built in.
    """
    builtin_names = {_module_name(b) for b in builtin}
    path_to_name = {path: name for name, (path, _) in deps.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen or name in builtin_names:
            return
        if name not in deps:
            needed_by = " <- ".join(stack) or "caller"
            raise NotFoundError(f"kernel module {name!r} not in modules.dep (needed by {needed_by})")
        if name in stack:
            raise FormatError(f"modules.dep has a cycle: {' -> '.join(stack + (name,))}")
        path, needs = deps[name]
        for dep_path in needs:
            visit(path_to_name.get(dep_path, _module_name(dep_path)), stack + (name,))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing .ko.xz / .ko.zst / .ko.gz (busybox insmod wants plain ELF)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    if data[:4] != _ELF_MAGIC:
        raise FormatError(f"kernel module {path} is not ELF after decompression")
    return data


# --------------------------------------------------------------------------- cpio


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One newc archive member. ``data`` is the file body or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A "newc" (SVR4, no CRC) cpio archive of *entries*, trailer included (pure).

    Parent directories must be listed before their members; the kernel's unpacker does not
    create them.
    """
    parts: list[bytes] = []
    ino = 1
    for entry in list(entries) + [CpioEntry("TRAILER!!!", 0)]:
        name = entry.name.lstrip("/").encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            ino, entry.mode, 0, 0, nlink, 0, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        parts += [header, name, _pad4(len(header) + len(name)), entry.data, _pad4(len(entry.data))]
        ino += 1
    return b"".join(parts)


# --------------------------------------------------------------------------- initrd


def find_busybox() -> Path:
    """A statically linked busybox on the host (Debian: busybox-static)."""
    for candidate in BUSYBOX_CANDIDATES:
        p = Path(candidate)
        if p.is_file():
            # A dynamic busybox would need its libc in the initrd; skip it.
            if _is_static_elf(p):
                return p
    raise NotFoundError("no static busybox found (apt-get install busybox-static)")


def _is_static_elf(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != _ELF_MAGIC or head[4] != 2:  # 64-bit only
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def _busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def render_init(module_files: Sequence[str]) -> str:
    """The /init shell script: mount pseudo filesystems, load modules, run /lazyfs/script.

    The script's stdout and stderr go to the serial console between the markers; its exit
    status is printed with the end marker. The guest then syncs and powers off at once
    (``poweroff -f``), so scripts should unmount what they wrote to if they want it clean.
    """
    insmods = "\n".join(
        f"insmod /lib/modules/{name} || echo 'lazyfs-init: insmod {name} failed'" for name in module_files
    )
    return f"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /tmp /mnt
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
{insmods}
echo {BEGIN_MARKER}
cd /
/bin/sh /lazyfs/script
rc=$?
printf '\\n{END_MARKER} rc=%d\\n' "$rc"
sync
poweroff -f
"""


def build_initrd(
    out: str | Path | None = None,
    modules: Iterable[str] = DEFAULT_MODULES,
    init_script: str = "true\n",
    kernel: Kernel | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Build (or reuse from the cache) a gzip'd newc initramfs and return its path.

    It holds static busybox with a symlink per applet, *modules* of *kernel* (default: the one
    :func:`find_kernel` picks) with their modules.dep dependencies, decompressed, an /init that
    loads them in dependency order, and *init_script* as /lazyfs/script, run by /bin/sh.
    *files* adds more members (guest path -> bytes, mode 0755). The cache key covers the kernel,
    modules, script, files and busybox.
    """
    kernel = kernel or find_kernel()
    busybox = find_busybox()
    modules = tuple(modules)
    files = dict(files or {})
    h = hashlib.sha256()
    for part in (
        f"format={_INITRD_FORMAT}",
        f"kernel={kernel.version}:{_file_fingerprint(kernel.modules_dir / 'modules.dep')}",
        f"modules={','.join(modules)}",
        f"busybox={_file_fingerprint(busybox)}",
        f"script={init_script}",
    ):
        h.update(part.encode() + b"\0")
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    cached = cache_dir() / f"initrd-{kernel.version}-{h.hexdigest()[:20]}.cpio.gz"
    try:
        os.utime(cached)  # recently used: kept by the pruning below, in this run or a parallel one
    except FileNotFoundError:
        _write_atomic(cached, _initrd_bytes(kernel, busybox, modules, init_script, files))
        _prune_initrds(cached.parent, keep=MAX_CACHED_INITRDS)
    if out is None:
        return cached
    out = Path(out)
    _write_atomic(out, cached.read_bytes())
    return out


MAX_CACHED_INITRDS = 24  # scripts that name a test's own ports or paths give a new initrd per run


def _prune_initrds(directory: Path, keep: int) -> None:
    """Delete all but the *keep* most recently written initrds in *directory* (a concurrent user of one
    that goes keeps its open file; a later build makes it again)."""
    written = []
    for path in directory.glob("initrd-*.cpio.gz"):
        try:
            written.append((path.stat().st_mtime_ns, path))
        except FileNotFoundError:  # pruned by a parallel test
            continue
    for _, old in sorted(written, reverse=True)[keep:]:
        old.unlink(missing_ok=True)


def _initrd_bytes(
    kernel: Kernel, busybox: Path, modules: Sequence[str], init_script: str, files: Mapping[str, bytes]
) -> bytes:
    deps = parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.is_file() else []
    paths = resolve_modules(deps, modules, builtin)

    d, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    entries: dict[str, CpioEntry] = {}

    def add_dirs(path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            entries.setdefault(sub, CpioEntry(sub, d))

    for top in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "mnt", "root", "lib"):
        entries[top] = CpioEntry(top, d)
    entries["lib/modules"] = CpioEntry("lib/modules", d)
    entries["lazyfs"] = CpioEntry("lazyfs", d)
    # The kernel opens /dev/console for init before any devtmpfs exists.
    entries["dev/console"] = CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    entries["dev/null"] = CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
    entries["bin/busybox"] = CpioEntry("bin/busybox", x, busybox.read_bytes())
    for applet in _busybox_applets(busybox):
        applet = applet.lstrip("/")
        if applet == "bin/busybox" or applet in entries:
            continue
        add_dirs(applet)
        entries[applet] = CpioEntry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox")
    module_files = []
    for rel in paths:
        name = _module_name(rel) + ".ko"
        module_files.append(name)
        member = f"lib/modules/{name}"
        entries[member] = CpioEntry(member, stat.S_IFREG | 0o644, read_module(kernel.modules_dir / rel))
    entries["init"] = CpioEntry("init", x, render_init(module_files).encode())
    # For callers that bring their own /init (in *files*): the modules to insmod, in order.
    entries["lazyfs/modules"] = CpioEntry("lazyfs/modules", stat.S_IFREG | 0o644, "".join(f"{m}\n" for m in module_files).encode())
    entries["lazyfs/script"] = CpioEntry("lazyfs/script", x, init_script.encode())
    for name, data in files.items():
        name = name.lstrip("/")
        add_dirs(name)
        entries[name] = CpioEntry(name, x, data)
    # Directories must precede their members; sorting by path does that.
    archive = newc_archive(entries[k] for k in sorted(entries))
    return gzip.compress(archive, compresslevel=1, mtime=0)


# --------------------------------------------------------------------------- boot


def parse_console(console: str) -> tuple[str, int | None]:
    """The script output and exit status framed by the markers in *console* (pure).

    Serial line endings are normalised to "\\n". Returns ("", None) if the script never began
    and (output so far, None) if it never ended.
    """
    text = console.replace("\r\n", "\n").replace("\r", "")
    begin = text.find(BEGIN_MARKER + "\n")
    if begin == -1:
        return "", None
    body = text[begin + len(BEGIN_MARKER) + 1 :]
    m = re.search(rf"\n{END_MARKER} rc=(\d+)\n", body)
    if m is None:
        return body, None
    return body[: m.start()], int(m.group(1))


def find_virtiofsd() -> Path:
    """The virtiofsd daemon (Debian 12: /usr/lib/qemu/virtiofsd from qemu-system-common)."""
    for candidate in VIRTIOFSD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("virtiofsd")
    if found:
        return Path(found)
    raise NotFoundError("virtiofsd not found (Debian 12: qemu-system-common; later: the virtiofsd package)")


def qemu_command(
    kernel: Path,
    initrd: Path,
    drives: Sequence[Drive] = (),
    share_socket: Path | None = None,
    share_tag: str = "",
    append: str = "",
    memory_mb: int = 512,
    accel: str = "tcg",
    cpus: int = 1,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The qemu command line :func:`boot` runs (pure); *extra_args* go at the end."""
    cmd = [
        QEMU, "-machine", "q35", "-accel", accel, "-cpu", "max", "-smp", str(cpus), "-m", f"{memory_mb}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 quiet panic=-1 {append}".strip(),
    ]  # fmt: skip
    for drive in drives:
        spec = f"file={drive.path},format={drive.format},if=virtio,cache=writeback"
        if drive.read_only:
            spec += ",readonly=on"
        cmd += ["-drive", spec]
    if share_socket is not None:
        # vhost-user needs guest RAM the daemon can map: a shared memfd backing the only NUMA node.
        cmd += [
            "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on", "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=vfs,path={share_socket}",
            "-device", f"vhost-user-fs-pci,chardev=vfs,tag={share_tag}",
        ]  # fmt: skip
    return cmd + list(extra_args)


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


def _start_virtiofsd(share: Share, socket_path: Path, log, timeout: float) -> subprocess.Popen:
    cmd = [
        str(find_virtiofsd()), f"--socket-path={socket_path}",
        "-o", f"source={share.directory}", "-o", "cache=none", "-o", "sandbox=chroot",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not socket_path.exists():
        if proc.poll() is not None:
            log.seek(0)
            raise LazyfsError(f"virtiofsd exited with {proc.returncode}: {log.read().decode(errors='replace')}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise LazyfsError(f"virtiofsd did not create {socket_path} within {timeout}s")
        time.sleep(0.02)
    return proc


def boot(
    kernel: str | Path,
    initrd: str | Path,
    drives: Sequence[Drive | str | Path] = (),
    virtiofs: Share | None = None,
    append: str = "",
    timeout: float = 120.0,
    memory_mb: int = 512,
    accel: str = "tcg",
    cpus: int = 1,
    extra_args: Sequence[str] = (),
) -> GuestResult:
    """Boot *kernel* (an ELF vmlinux) with *initrd* and wait for the guest to power off.

    *drives* become /dev/vda, /dev/vdb, ... (a bare path is a writable raw disk); *virtiofs*
    starts virtiofsd for the share and attaches it; *extra_args* are appended to qemu's command
    line (e.g. a ``-virtfs`` share). qemu (and virtiofsd) are killed after
    *timeout* seconds; the result then has ``timed_out`` set and the console so far. Never
    leaves a process behind.
    """
    drives = [d if isinstance(d, Drive) else Drive(Path(d)) for d in drives]
    for drive in drives:
        if not Path(drive.path).is_file():
            raise NotFoundError(f"disk image {drive.path} does not exist")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lazyfs-guest-")))
        socket_path = vfs_log = None
        if virtiofs is not None:
            if not Path(virtiofs.directory).is_dir():
                raise NotFoundError(f"shared directory {virtiofs.directory} does not exist")
            socket_path = workdir / "vfs.sock"
            vfs_log = stack.enter_context(open(workdir / "virtiofsd.log", "w+b"))
            vfsd = _start_virtiofsd(virtiofs, socket_path, vfs_log, timeout=min(timeout, 30.0))
            stack.callback(_stop, vfsd)
        cmd = qemu_command(
            Path(kernel), Path(initrd), drives, socket_path, virtiofs.tag if virtiofs else "", append, memory_mb, accel,
            cpus, extra_args,
        )
        console_path = workdir / "console"
        with open(console_path, "w+b") as console_file:
            start = time.monotonic()
            # Output goes to a file, not a pipe: nothing to drain, and a timeout keeps what was said.
            qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console_file, stderr=subprocess.STDOUT)
            timed_out = False
            try:
                qemu.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _stop(qemu)
            seconds = time.monotonic() - start
            console_file.seek(0)
            console = console_file.read().decode(errors="replace")
        daemon_log = ""
        if vfs_log is not None:
            vfs_log.seek(0)
            daemon_log = vfs_log.read().decode(errors="replace")
    output, rc = parse_console(console)
    return GuestResult(output, rc, seconds, console, timed_out, qemu.returncode, daemon_log)


@dataclass(frozen=True, slots=True)
class Guest:
    """A kernel and module set ready to boot; :meth:`run` boots a fresh guest per script."""

    vmlinux: Path
    kernel: Kernel
    modules: tuple[str, ...] = DEFAULT_MODULES

    def run(
        self,
        script: str,
        drives: Sequence[Drive | str | Path] = (),
        virtiofs: Share | None = None,
        files: Mapping[str, bytes] | None = None,
        append: str = "",
        timeout: float = 120.0,
    ) -> GuestResult:
        """Boot a guest that runs *script* (/bin/sh) and return its result."""
        initrd = build_initrd(modules=self.modules, init_script=script, kernel=self.kernel, files=files)
        return boot(self.vmlinux, initrd, drives, virtiofs, append, timeout)


def prepare_guest(modules: Iterable[str] = DEFAULT_MODULES) -> Guest:
    """Find the kernel, extract (or reuse) its vmlinux and return a :class:`Guest`.

    Raises NotFoundError when something needed is missing.
    """
    if shutil.which(QEMU) is None:
        raise NotFoundError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    kernel = find_kernel()
    find_busybox()
    return Guest(extract_vmlinux(kernel.vmlinuz), kernel, tuple(modules))


def qemu_unusable_reason(accel: str = "tcg") -> str | None:
    """Why qemu-system-x86_64 cannot start here (missing, or lacking *accel*), or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    try:
        out = subprocess.run([QEMU, "-accel", "help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{QEMU} does not start: {exc}"
    if out.returncode != 0:
        return f"{QEMU} does not start: {out.stderr.strip() or out.returncode}"
    if accel not in out.stdout.split():
        return f"{QEMU} lacks the {accel} accelerator (has: {' '.join(out.stdout.split()[1:])})"
    return None


def require_qemu(modules: Iterable[str] = DEFAULT_MODULES, virtiofs: bool = False) -> Guest:
    """A ready :class:`Guest`, or pytest.skip (reason printed) when the host cannot run one.

    Skips only when qemu-system-x86_64 is missing or cannot start, or no kernel with modules,
    static busybox or (with *virtiofs*) virtiofsd is installed. A guest that then fails to
    boot is a test failure, not a skip.
    """
    import pytest

    reason = qemu_unusable_reason()
    guest = None
    if reason is None:
        try:
            if virtiofs:
                find_virtiofsd()
            guest = prepare_guest(modules)
        except NotFoundError as exc:
            reason = str(exc)
    if guest is None:
        print(f"SKIP qemu guest: {reason}")
        pytest.skip(reason)
    return guest


__all__ = [
    "BEGIN_MARKER",
    "BLOCK_MODULES",
    "DEFAULT_MODULES",
    "END_MARKER",
    "VIRTIOFS_MODULES",
    "CpioEntry",
    "Drive",
    "Guest",
    "GuestError",
    "GuestResult",
    "Kernel",
    "Share",
    "boot",
    "build_initrd",
    "cache_dir",
    "decompress_vmlinux",
    "extract_vmlinux",
    "find_busybox",
    "find_kernel",
    "find_virtiofsd",
    "newc_archive",
    "parse_console",
    "parse_modules_dep",
    "payload_candidates",
    "prepare_guest",
    "qemu_unusable_reason",
    "qemu_command",
    "read_module",
    "render_init",
    "require_qemu",
    "resolve_modules",
]
