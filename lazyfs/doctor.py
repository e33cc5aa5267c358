"""`lazyfs doctor`: what this host offers lazyfs, what is missing, and what that costs.

:func:`diagnose` is pure: it judges :class:`lazyfs.hostprobe.HostFacts` and the daemon's state
against a config and returns one :class:`Check` per topic. :func:`examine` gathers the facts
(``lazyfs.hostprobe`` for the host, the control socket for the daemon) and calls it.

A check is ``ok`` (works), ``unused`` (the kernel has it, lazyfs cannot use it yet), ``warn``
(works, at a cost), ``missing`` (an optional feature is absent) or ``FAIL`` (``lazyfs mount``
cannot work). The exit status is 0 exactly when no check failed.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

from lazyfs.config import Config
from lazyfs.errors import LazyfsError
from lazyfs.hostprobe import HostFacts, PathFacts, kernel_option, probe_host

#: below this, a directory lazyfs must write to (state file, control socket, writable layer) is full
MIN_FREE_BYTES = 1 << 20
#: below this, the disk cache cannot hold even a few chunks
MIN_CACHE_FREE_BYTES = 64 << 20
FUSE_PASSTHROUGH_SINCE = (6, 9)
FUSE_NOTIFY_RESEND_SINCE = (6, 9)
FUSE_IO_URING_SINCE = (6, 14)


class Status(enum.Enum):
    OK = "ok"
    UNUSED = "unused"
    WARN = "warn"
    MISSING = "missing"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: a topic, its status and what it means for lazyfs."""

    topic: str
    status: Status
    text: str

    def line(self) -> str:
        return f"{self.status.value:<8}{self.topic:<20}{self.text}"


@dataclass(frozen=True, slots=True)
class DaemonFacts:
    """What the control socket said: the ping answer and attachment count, or the error."""

    socket: str
    socket_exists: bool
    pid: int | None = None
    attached: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    kernel: str
    checks: tuple[Check, ...]

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status is Status.FAIL)

    @property
    def mount_can_work(self) -> bool:
        return not self.failed

    @property
    def exit_status(self) -> int:
        return 0 if self.mount_can_work else 1

    def lines(self) -> list[str]:
        out = [f"lazyfs doctor: {self.kernel}", ""] + [c.line() for c in self.checks] + [""]
        if self.mount_can_work:
            out.append("lazyfs mount can work here.")
        else:
            out.append(f"lazyfs mount cannot work here: {', '.join(c.topic for c in self.failed)}.")
        return out

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "mount_can_work": self.mount_can_work,
                "checks": [{"topic": c.topic, "status": c.status.value, "text": c.text} for c in self.checks]}


def human(n: float) -> str:
    """``12884901888`` -> ``"12 GiB"`` (binary units, at most one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ the judge (pure)


def _version(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def _where(p: PathFacts) -> str:
    made = "" if p.exists else f" (not created yet; {p.probed} exists)"
    return f"{p.path}{made} on {p.fstype} at {p.mountpoint}"


def _dir_problem(p: PathFacts) -> str | None:
    """Why lazyfs could not create or write *p*, or None."""
    if p.read_only:
        return f"{_where(p)} is on a read-only file system"
    if not p.writable:
        return f"{_where(p)} is not writable by this user"
    return None


def check_root(facts: HostFacts) -> Check:
    if facts.euid == 0:
        return Check("root", Status.OK, "running as root (losetup and mount need it)")
    return Check("root", Status.FAIL, f"running as uid {facts.euid}: lazyfs mount needs root for losetup and mount")


def check_fuse(facts: HostFacts) -> Check:
    problems = []
    if "fuse" not in facts.kernel.filesystems:
        problems.append("the kernel has no fuse file system (CONFIG_FUSE_FS)")
    if not facts.fuse_device.ok:
        problems.append(facts.fuse_device.detail)
    if not facts.pyfuse3.ok:
        problems.append(facts.pyfuse3.detail)
    if problems:
        return Check("FUSE", Status.FAIL, "; ".join(problems) + ": the daemon cannot export images (mount and export fail)")
    return Check("FUSE", Status.OK, f"{facts.fuse_device.detail}, {facts.pyfuse3.detail}: the daemon exports images")


def check_loop(facts: HostFacts) -> Check:
    if facts.loop.ok:
        return Check("loop devices", Status.OK, f"{facts.loop.detail}: lazyfs mount loop-mounts the exported file")
    return Check("loop devices", Status.FAIL,
                 f"{facts.loop.detail}: lazyfs mount cannot work (lazyfs export for qemu still can)")


def check_ext4(facts: HostFacts) -> Check:
    if "ext4" in facts.kernel.filesystems:
        return Check("ext4", Status.OK, "in the kernel: images mount as ext4")
    if kernel_option(facts.kernel, "CONFIG_EXT4_FS") == "m":
        return Check("ext4", Status.OK, "a module (CONFIG_EXT4_FS=m), loaded by the first mount")
    return Check("ext4", Status.FAIL, "the kernel has no ext4: lazyfs images cannot be mounted")


def check_tools(facts: HostFacts) -> Check:
    missing = [t for t in ("losetup", "mount", "umount") if not facts.tools.get(t)]
    if missing:
        return Check("tools", Status.FAIL, f"{', '.join(missing)} not installed (util-linux, mount): lazyfs mount needs them")
    if not facts.tools.get("blockdev"):
        return Check("tools", Status.WARN, "blockdev not installed: loop devices keep the default readahead (slower scans)")
    return Check("tools", Status.OK, "losetup, mount, umount and blockdev installed")


def check_state_dir(name: str, p: PathFacts, why: str) -> Check:
    problem = _dir_problem(p)
    if problem is None and p.free_bytes < MIN_FREE_BYTES:
        problem = f"{_where(p)} is full ({human(p.free_bytes)} free)"
    if problem:
        return Check(name, Status.FAIL, f"{problem}: {why}")
    return Check(name, Status.OK, f"{_where(p)}, {human(p.free_bytes)} free")


def check_cache_root(p: PathFacts, cache_size: int) -> Check:
    problem = _dir_problem(p)
    if problem and not p.exists:
        return Check("cache root", Status.FAIL, f"{problem}: the daemon cannot create its cache and does not start")
    if problem:
        return Check("cache root", Status.WARN,
                     f"{problem}: chunks are not kept on disk; each is fetched again once it leaves the memory cache")
    if p.free_bytes < MIN_CACHE_FREE_BYTES:
        return Check("cache root", Status.WARN,
                     f"{_where(p)} is full ({human(p.free_bytes)} free): chunks are not kept on disk; "
                     "each is fetched again once it leaves the memory cache")
    if p.free_bytes < cache_size:
        return Check("cache root", Status.WARN,
                     f"{_where(p)}: {human(p.free_bytes)} free, less than the {human(cache_size)} cache limit: "
                     "when the disk fills, new chunks are no longer cached")
    return Check("cache root", Status.OK, f"{_where(p)}, {human(p.free_bytes)} free for a {human(cache_size)} cache")


def check_writable_root(p: PathFacts) -> Check:
    problem = _dir_problem(p)
    if problem is None and p.free_bytes < MIN_FREE_BYTES:
        problem = f"{_where(p)} is full ({human(p.free_bytes)} free)"
    if problem:
        return Check("writable root", Status.MISSING,
                     f"{problem}: lazyfs mount --writable cannot work (read-only mounts can)")
    return Check("writable root", Status.OK, f"{_where(p)}, {human(p.free_bytes)} free for writable layers")


def check_fusectl(facts: HostFacts) -> Check:
    if facts.fusectl.ok:
        return Check("fusectl", Status.OK, f"{facts.fusectl.detail}: a hung daemon's connection can be aborted")
    if "fusectl" in facts.kernel.filesystems:
        return Check("fusectl", Status.OK, f"{facts.fusectl.detail}")
    return Check("fusectl", Status.MISSING,
                 f"{facts.fusectl.detail}: a hung daemon's mounts can only be detached lazily, its readers wait")


def _kernel_feature(facts: HostFacts, option: str | None, since: tuple[int, int]) -> tuple[bool | None, str]:
    """(present?, how we know): from the config when readable, else from the kernel version."""
    k = facts.kernel
    if option is not None:
        value = kernel_option(k, option)
        if value is not None:
            return value in ("y", "m"), f"{option}={value}" if value != "n" else f"{option} is not set"
    if k.version >= since:
        return True, f"kernel {_version(k.version)} >= {_version(since)}"
    return False, f"kernel {_version(k.version)} < {_version(since)}"


def check_fuse_passthrough(facts: HostFacts) -> Check:
    has, why = _kernel_feature(facts, "CONFIG_FUSE_PASSTHROUGH", FUSE_PASSTHROUGH_SINCE)
    if has:
        return Check("FUSE passthrough", Status.OK,
                     f"in the kernel ({why}): once a read-only image is hydrated, new opens of its exported "
                     "disk.img are served by the kernel from the hydrated file (docs/warm.md §3)")
    return Check("FUSE passthrough", Status.MISSING,
                 f"not in this kernel ({why}): reads of exported disk.img files always go through the daemon; "
                 "new mounts of hydrated images still bypass FUSE (a loop on the hydrated file)")


def check_fuse_resend(facts: HostFacts) -> Check:
    has, why = _kernel_feature(facts, None, FUSE_NOTIFY_RESEND_SINCE)
    if has:
        return Check("FUSE_NOTIFY_RESEND", Status.OK,
                     f"in the kernel ({why}): a restarted daemon takes the kept FUSE connection over and has the "
                     "requests in flight at its predecessor's death sent again; readers wait, never get EIO")
    return Check("FUSE_NOTIFY_RESEND", Status.MISSING,
                 f"not in this kernel ({why}): a restarted daemon takes the kept FUSE connection over, but a "
                 "request in flight at the crash is never answered (its reader waits until the mount is aborted)")


def check_fuse_io_uring(facts: HostFacts) -> Check:
    has, why = _kernel_feature(facts, "CONFIG_FUSE_IO_URING", FUSE_IO_URING_SINCE)
    if not has:
        return Check("FUSE over io_uring", Status.MISSING,
                     f"not in this kernel ({why}); costs nothing today: pyfuse3 speaks only /dev/fuse")
    enabled = facts.kernel.fuse_uring_enabled
    switch = {True: "switched on", False: "switched off (fuse.enable_uring=N)", None: "no enable_uring switch"}[enabled]
    return Check("FUSE over io_uring", Status.UNUSED,
                 f"in the kernel ({why}), {switch}; unused: pyfuse3 speaks only /dev/fuse, "
                 "one request per read(2) instead of a shared ring")


def check_native_reads(facts: HostFacts, config: Config) -> Check:
    if not facts.native_reads.ok:
        return Check("FUSE reads in C", Status.MISSING,
                     f"{facts.native_reads.detail}; warm reads of images not hydrated are answered in Python, "
                     "at about 5-10 times the daemon CPU per read (docs/warm.md §4; rebuild: pip install -e .)")
    if not config.fuse_native_reads or not config.fuse_threads:
        return Check("FUSE reads in C", Status.UNUSED, "built; switched off (fuse_native_reads = false or fuse_threads = 0)")
    return Check("FUSE reads in C", Status.OK, "built: the FUSE threads answer warm reads of flat-file blocks in C")


def check_hydrated_switch(facts: HostFacts, config: Config) -> Check:
    name = "hydrated switch"
    if config.hydrated_switch == "off" or config.hydrated_max_bytes <= 0:
        return Check(name, Status.UNUSED, "switched off (hydrated_switch = off or hydrated_max_bytes = 0)")
    if not facts.device_mapper.ok:
        return Check(name, Status.MISSING,
                     f"{facts.device_mapper.detail}: a running read-only mount keeps reading through FUSE once its "
                     "image is hydrated (new mounts use the hydrated file; docs/warm.md §3)")
    return Check(name, Status.OK, f"{facts.device_mapper.detail}: the daemon moves running read-only mounts onto "
                                  "their images' hydrated files (device-mapper table swap, no remount)")


def check_io_uring(facts: HostFacts) -> Check:
    sysctl = "" if facts.io_uring_disabled is None else f", kernel.io_uring_disabled={facts.io_uring_disabled}"
    if facts.io_uring.ok:
        return Check("io_uring", Status.UNUSED, f"{facts.io_uring.detail}{sysctl}; unused: lazyfs does its I/O "
                                                "with threads and epoll (FUSE over io_uring would need it)")
    return Check("io_uring", Status.MISSING,
                 f"{facts.io_uring.detail}{sysctl}: FUSE over io_uring could not be used; nothing else lost")


def check_tcmu(facts: HostFacts) -> Check:
    k = facts.kernel
    if {"target_core_user", "tcm_loop"} <= k.modules and facts.configfs_target:
        return Check("target_core_user", Status.OK, "loaded, configfs mounted: lazyfs tcmu attach serves SCSI disks")
    cost = "lazyfs tcmu attach cannot work (lazyfs mount and export can)"
    value = kernel_option(k, "CONFIG_TCM_USER2")
    if "target_core_user" not in k.modules:
        if value == "m":
            return Check("target_core_user", Status.MISSING,
                         f"a module, not loaded (modprobe target_core_user tcm_loop): {cost}")
        known = "not in this kernel (CONFIG_TCM_USER2 is not set)" if value == "n" else "not loaded, not built in"
        return Check("target_core_user", Status.MISSING, f"{known}: {cost}")
    if "tcm_loop" not in k.modules:
        return Check("target_core_user", Status.MISSING,
                     f"loaded, but not the loopback fabric tcm_loop (modprobe tcm_loop): {cost}")
    return Check("target_core_user", Status.MISSING,
                 f"loaded, but configfs is not mounted (mount -t configfs none /sys/kernel/config): {cost}")


def check_verity(facts: HostFacts, cache: PathFacts) -> Check:
    cost = ("unused by lazyfs: flat-cache reads check every 4 KiB block against a blake3 sidecar instead, "
            "chunk files are re-hashed whole (docs/cache.md)")
    value = kernel_option(facts.kernel, "CONFIG_FS_VERITY")
    if value == "n":
        return Check("fs-verity", Status.MISSING, f"not in this kernel (CONFIG_FS_VERITY is not set); {cost}")
    if facts.verity is None:
        return Check("fs-verity", Status.MISSING if value is None else Status.UNUSED,
                     f"kernel config {'unknown' if value is None else 'has CONFIG_FS_VERITY=' + value}; the cache root "
                     f"does not exist yet, so {cache.fstype} was not probed; {cost}")
    if facts.verity.ok:
        return Check("fs-verity", Status.UNUSED, f"works on the cache file system ({cache.fstype} at {cache.mountpoint}); "
                                                  "unused: cached blocks are checked against a blake3 sidecar instead")
    hint = " (ext4 needs its verity feature: tune2fs -O verity DEVICE)" if cache.fstype == "ext4" and value == "y" else ""
    return Check("fs-verity", Status.MISSING,
                 f"not on the cache file system ({cache.fstype}: {facts.verity.detail}){hint}; {cost}")


def check_overlay(facts: HostFacts) -> Check:
    if "overlay" in facts.kernel.filesystems:
        return Check("overlayfs", Status.OK, "in the kernel: podman --rootfs DIR:O and the snapshotter's overlay mode work")
    return Check("overlayfs", Status.MISSING,
                 "not in the kernel: no podman --rootfs DIR:O, and the snapshotter needs --mode block")


def check_kvm(facts: HostFacts) -> Check:
    tcg = "-accel tcg (software emulation, many times slower)"
    if not facts.kvm.ok:
        return Check("KVM", Status.MISSING, f"{facts.kvm.detail}: qemu guests need {tcg}")
    if "kvm_pvm" in facts.kernel.modules and not facts.cpu_virtualization:
        return Check("KVM", Status.WARN, f"{facts.kvm.detail}, but it is PVM (kvm_pvm, no vmx/svm): only guest "
                                         f"kernels built for PVM run with -accel kvm; others need {tcg}")
    return Check("KVM", Status.OK, f"{facts.kvm.detail}: qemu guests run with -accel kvm")


def _tool(facts: HostFacts, name: str) -> str:
    version = facts.versions.get(name)
    return f"{name} {version}" if version else name


def check_qemu(facts: HostFacts, qemu: str) -> Check:
    if facts.tools.get(qemu):
        return Check("qemu", Status.OK, f"{_tool(facts, qemu)}: lazyfs export DIR gives qemu -drive a lazy disk")
    return Check("qemu", Status.MISSING, f"{qemu} not installed: no local VMs (lazyfs export still serves other VMMs)")


def check_containerd(facts: HostFacts) -> Check:
    if not facts.tools.get("containerd"):
        return Check("containerd", Status.MISSING, "not installed: lazyfs snapshotter and rpull have nothing to serve")
    if not facts.containerd_socket:
        return Check("containerd", Status.WARN, f"{_tool(facts, 'containerd')} installed, not running "
                                                "(no /run/containerd/containerd.sock): lazyfs rpull needs it running")
    return Check("containerd", Status.OK, f"{_tool(facts, 'containerd')} running: lazyfs snapshotter and rpull can work")


def check_runtime(facts: HostFacts) -> Check:
    found = [_tool(facts, r) for r in ("runc", "crun") if facts.tools.get(r)]
    if found:
        return Check("OCI runtime", Status.OK, f"{', '.join(found)}: containers can run on lazyfs mounts")
    return Check("OCI runtime", Status.MISSING, "neither runc nor crun installed: containerd and podman cannot run containers")


def check_podman(facts: HostFacts) -> Check:
    if not facts.tools.get("podman"):
        return Check("podman", Status.MISSING, "not installed: use runc or containerd on lazyfs mounts instead")
    lacking = [what for what, ok in (("overlayfs", "overlay" in facts.kernel.filesystems),
                                     ("runc or crun", facts.tools.get("runc") or facts.tools.get("crun"))) if not ok]
    if lacking:
        return Check("podman", Status.MISSING,
                     f"{_tool(facts, 'podman')} installed, but no {' and no '.join(lacking)}: "
                     "podman run --rootfs TARGET:O cannot work")
    return Check("podman", Status.OK, f"{_tool(facts, 'podman')}: podman run --rootfs TARGET:O works on a lazyfs "
                                      "mount (contrib/podman)")


def check_daemon(daemon: DaemonFacts) -> Check:
    if daemon.pid is not None:
        return Check("daemon", Status.OK, f"pid {daemon.pid} answers on {daemon.socket}, "
                                          f"{daemon.attached} image{'s' if daemon.attached != 1 else ''} attached")
    if daemon.socket_exists:
        return Check("daemon", Status.WARN, f"{daemon.socket} exists but no daemon answers ({daemon.error}): "
                                            "a crashed daemon; lazyfs mount starts a new one and clears its export")
    return Check("daemon", Status.OK, f"not running (no {daemon.socket}): lazyfs mount starts one")


def diagnose(facts: HostFacts, daemon: DaemonFacts, config: Config) -> Report:
    """Judge *facts* for *config*: one check per topic, in the order a reader needs them."""
    paths = facts.paths
    k = facts.kernel
    source = f"config from {k.config_source}" if k.config_source else "kernel config not readable"
    checks = (
        check_root(facts),
        check_fuse(facts),
        check_loop(facts),
        check_ext4(facts),
        check_tools(facts),
        check_state_dir("run dir", paths["run_dir"], "the daemon cannot create its control socket and export"),
        check_state_dir("state dir", paths["state_dir"], "attachments cannot be recorded, so every attach fails"),
        check_cache_root(paths["cache_root"], config.cache_size + config.flat_cache_size),  # both disk tiers
        check_writable_root(paths["writable_root"]),
        check_fusectl(facts),
        check_fuse_passthrough(facts),
        check_fuse_resend(facts),
        check_fuse_io_uring(facts),
        check_native_reads(facts, config),
        check_hydrated_switch(facts, config),
        check_io_uring(facts),
        check_tcmu(facts),
        check_verity(facts, paths["cache_root"]),
        check_overlay(facts),
        check_kvm(facts),
        check_qemu(facts, next((t for t in facts.tools if t.startswith("qemu-system-")), "qemu-system")),
        check_containerd(facts),
        check_runtime(facts),
        check_podman(facts),
        check_daemon(daemon),
    )
    return Report(kernel=f"Linux {k.release} ({source})", checks=checks)


# ------------------------------------------------------------------ the shell


def probe_daemon(config: Config) -> DaemonFacts:
    """Ask the daemon on the control socket (a few seconds at most)."""
    from lazyfs.serve.control import call

    sock = config.socket_path
    exists = os.path.exists(sock)
    if not exists:
        return DaemonFacts(sock, False)
    try:
        ping = call(sock, "ping", timeout=5)
        attached = len(call(sock, "list", timeout=5))
    except LazyfsError as exc:
        return DaemonFacts(sock, True, error=str(exc))
    return DaemonFacts(sock, True, pid=ping.get("pid") if isinstance(ping, Mapping) else None, attached=attached)


def examine(config: Config) -> Report:
    """Probe this host and the daemon for *config* and judge what lazyfs can do here (blocks: seconds)."""
    facts = probe_host({"run_dir": config.run_dir, "state_dir": config.state_dir, "cache_root": config.cache_root,
                        "writable_root": config.writable_root}, verity_in=config.cache_root)
    return diagnose(facts, probe_daemon(config), config)
