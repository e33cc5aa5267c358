"""What `lazyfs mount/umount/export/commit/stats` do on the client side of the daemon."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence

from lazyfs.config import Config
from lazyfs.durable import write_atomically
from lazyfs.errors import BusyError, ConfigError, FormatError, LazyfsError, NotFoundError
from lazyfs.serve import dmswitch, mountinfo, syscmd, warmloop
from lazyfs.serve.control import call
from lazyfs.serve.fusekernel import keeper
from lazyfs.serve.privatedir import private_dir
from lazyfs.serve.singleton import daemon_lock, owner_pid, start_lock
from lazyfs.serve.state import IMAGE_NAME, AttachmentRecord, FrontEnd, attachment_name, decode_state

DAEMON_START_TIMEOUT = 30.0
# how often a starting daemon is asked whether it answers: a cold `lazyfs mount` waits for it, and
# a refused connect costs microseconds (50 ms cost 25 ms of every such mount on average)
DAEMON_START_POLL = 0.01


def daemon_alive(config: Config) -> bool:
    try:
        call(config.socket_path, "ping", timeout=5)
        return True
    except LazyfsError:
        return False


def ensure_daemon(config: Config, config_path: str | None) -> bool:
    """Start `lazyfs daemon` in the background unless one answers; True if this call started it.

    Concurrent callers start one daemon: they take turns on the run directory's start lock, and
    none spawns while a daemon (perhaps still starting) holds the daemon lock.
    """
    if daemon_alive(config):
        return False
    private_dir(config.run_dir)
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    log_path = os.path.join(config.run_dir, "daemon.log")
    with start_lock(config.run_dir, deadline):
        if daemon_alive(config):
            return False
        proc = None if owner_pid(config.run_dir) is not None else _spawn_daemon(config, config_path, log_path)
        while time.monotonic() < deadline:
            if daemon_alive(config):
                return proc is not None
            if proc is not None and proc.poll() is not None and owner_pid(config.run_dir) is None:
                raise LazyfsError(f"the lazyfs daemon exited with status {proc.returncode}; see {log_path}")
            time.sleep(DAEMON_START_POLL)
    raise LazyfsError(f"the lazyfs daemon did not start within {DAEMON_START_TIMEOUT:.0f} s; see {log_path}")


def _spawn_daemon(config: Config, config_path: str | None, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lazyfs.cli", "daemon"]
    env = dict(os.environ)
    if config_path:
        env["LAZYFS_CONFIG"] = os.path.abspath(config_path)
    # the daemon imports the same lazyfs as this process, installed or not
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600), "ab")
    with log:
        os.fchmod(log.fileno(), 0o600)  # also a log an older lazyfs made readable
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True, cwd="/")


def target_name(image: str, target: str) -> str:
    """The attachment name for *image* mounted at *target* (one attachment per target)."""
    digest = hashlib.sha256(os.path.abspath(target).encode()).hexdigest()[:10]
    return f"{attachment_name(image)[:80]}-{digest}"


def _check_target(target: str) -> str:
    target = os.path.abspath(target)
    if not os.path.exists(target):
        raise NotFoundError(f"{target} does not exist")
    if not os.path.isdir(target):
        raise ConfigError(f"{target} is not a directory")
    if mountinfo.is_mountpoint(target):
        raise BusyError(f"{target} is already a mount point")
    return target


def writable_dir_under(writable_root: str | None, name: str, writable: bool) -> str | None:
    """The writable layer directory of attachment *name* under *writable_root* (None: the daemon's default)."""
    if writable_root is None:
        return None
    if not writable:
        raise ConfigError("--writable-root is for a writable image: add --writable")
    return os.path.join(os.path.abspath(writable_root), name)


def mount_image(config: Config, config_path: str | None, image: str, target: str, *, writable: bool = False,
                writable_root: str | None = None, kind: str = "sparse", prefer_lazyfs: bool = False,
                plain_http: Sequence[str] = (), devices: bool = False, setuid: bool = False,
                hydrate: bool | dict | None = None) -> dict:
    """Attach *image* through the daemon, loop-attach its file and mount the ext4 at *target*.

    *writable_root*: the writable layer goes in a directory of its own under it (default: under
    the daemon's configured writable root). *plain_http*: registries the daemon speaks plain
    HTTP to for this image, besides those its config lists.
    *prefer_lazyfs*: *image* may be an ordinary image; mount its lazyfs twin (found through the
    referrers fallback tag of its manifest, where ``lazyfs convert`` lists it) if the trust
    policy accepts one. The result's ``note`` then says what was mounted instead of *image*.
    The ext4 is mounted ``nodev,nosuid`` unless *devices* / *setuid*: device nodes and set-id files
    of a registry image are honoured only when asked for.
    *hydrate*: make the image fully local in the background (None: the daemon's config decides;
    True; False; ``{"rate": BYTES_PER_S}`` or ``{"deadline": SECONDS}``), kept across restarts.
    """
    started = time.monotonic()
    target = _check_target(target)
    twin = None
    if prefer_lazyfs:
        from lazyfs.image.convert import resolve_twin_blocking

        twin = resolve_twin_blocking(config.with_plain_http(plain_http), image)
        image = twin.ref
    name = target_name(image, target)
    writable_dir = writable_dir_under(writable_root, name, writable)
    ensure_daemon(config, config_path)
    attached = call(config.socket_path, "attach", image=image, name=name, writable=writable,
                    writable_dir=writable_dir, kind=kind, front_end=FrontEnd(mode="mount", target=target).to_json(),
                    plain_http=list(plain_http), **_hydrate_arg(hydrate))
    dev = dm = None
    try:
        loop = warmloop.plan(config, attached, writable)
        dev = syscmd.losetup_attach_blocking(loop.path, not writable, loop.direct_io)
        mounted = dev
        if switchable(config, writable, loop.route):
            # the daemon moves the mount onto the hydrated file later by swapping this device's table
            dm = dmswitch.device_name(name)
            mounted = syscmd.run_steps_blocking(dmswitch.create_steps(dm, dev, attached["size"]))
        call(config.socket_path, "mark", name=name,
             front_end=FrontEnd(loop=dev, loop_route=loop.route, dm=dm).to_json())
        options = ([] if devices else ["nodev"]) + ([] if setuid else ["nosuid"])
        if not writable:
            options.append("noload")  # never replay a journal on a read-only image
        syscmd.mount_blocking(mounted, target, "ext4", read_only=not writable, options=options)
    except LazyfsError as exc:
        cause = _read_error(config, name)
        _undo(config, name, dev, dm)
        if cause is None:
            raise
        # mount(8) says only "can't read superblock": say why the image could not be read
        raise LazyfsError(f"{exc} (reading the image failed: {cause})") from exc
    except BaseException:
        _undo(config, name, dev, dm)
        raise
    result = {**attached, "loop": dev, "loop_route": loop.route, "loop_file": loop.path, "target": target,
              "seconds": round(time.monotonic() - started, 3)}
    if dm is not None:
        result["dm"] = dmswitch.device_path(dm)
    notes = [n for n in (twin.note() if twin is not None and twin.replaced else None, loop.note()) if n]
    if twin is not None and twin.replaced:
        result["twin"] = twin.to_json()
    if notes:
        result["note"] = "; ".join(notes)
    return result


def switchable(config: Config, writable: bool, route: str) -> bool:
    """Whether a mount goes through a switchable device-mapper device (serve/dmswitch.py): a
    read-only one not on a hydrated file yet, with hydrated files and the switch on, on a host
    with device-mapper."""
    return (not writable and route != "hydrated" and config.hydrated_switch == "auto"
            and config.hydrated_max_bytes > 0 and dmswitch.unavailable_reason() is None)


def _hydrate_arg(hydrate: bool | dict | None) -> dict:
    """The attach request's ``hydrate`` argument (left out when the daemon's config decides)."""
    return {} if hydrate is None else {"hydrate": hydrate}


def _read_error(config: Config, name: str) -> str | None:
    """Why the last read of attachment *name* failed, if one did (best effort)."""
    try:
        return call(config.socket_path, "stats", timeout=10, name=name).get("last_error")
    except LazyfsError:
        return None


def _undo(config: Config, name: str, dev: str | None, dm: str | None = None) -> None:
    """Best-effort rollback of a failed mount; the error that caused it is what the user sees."""
    if dm is not None:
        with contextlib.suppress(LazyfsError):
            syscmd.run_steps_blocking(dmswitch.remove_steps(dm))
    if dev is not None and os.path.exists(syscmd.loop_sysfs(dev)):  # a loop under dm clears itself
        with contextlib.suppress(LazyfsError):
            syscmd.losetup_detach_blocking(dev)
    with contextlib.suppress(LazyfsError):
        call(config.socket_path, "detach", name=name)


def export_image(config: Config, config_path: str | None, image: str, directory: str, *, writable: bool = False,
                 writable_root: str | None = None, kind: str = "sparse", plain_http: Sequence[str] = (),
                 hydrate: bool | dict | None = None) -> dict:
    """Attach *image* and make ``DIRECTORY/disk.img`` point at its exported file (for qemu, Kata).

    *writable_root*, *plain_http* and *hydrate* as for `mount_image`.
    """
    directory = os.path.abspath(directory)
    link = os.path.join(directory, IMAGE_NAME)
    if os.path.lexists(link):
        raise BusyError(f"{link} already exists")
    name = target_name(image, directory)
    writable_dir = writable_dir_under(writable_root, name, writable)
    os.makedirs(directory, exist_ok=True)
    ensure_daemon(config, config_path)
    attached = call(config.socket_path, "attach", image=image, name=name, writable=writable,
                    writable_dir=writable_dir, kind=kind, front_end=FrontEnd(mode="export", target=directory).to_json(),
                    plain_http=list(plain_http), **_hydrate_arg(hydrate))
    try:
        os.symlink(attached["path"], link)
    except BaseException:
        _undo(config, name, None)
        raise
    return {**attached, "file": link}


def _attachment_for(config: Config, target: str) -> AttachmentRecord | None:
    """The attachment mounted or exported at *target*: the daemon's, or the state file's if it is gone."""
    target = os.path.abspath(target)
    try:
        records = [_listed(entry) for entry in call(config.socket_path, "list", timeout=10)]
    except NotFoundError:
        records = _state_records(config)
    return next((r for r in records if r.front_end.target == target), None)


def _listed(entry: dict) -> AttachmentRecord:
    """An entry of the daemon's ``list`` (the front end's fields beside the attachment's) as a record."""
    front_end = {k: entry[k] for k in FrontEnd.__struct_fields__ if entry.get(k) is not None}
    return AttachmentRecord.from_json({"name": entry.get("name"), "image": entry.get("image"), "front_end": front_end},
                                      "the daemon's list of attachments")


def _state_records(config: Config) -> tuple[AttachmentRecord, ...]:
    try:
        with open(config.state_file, "rb") as f:
            return decode_state(f.read(), f"state file {config.state_file}").records
    except (OSError, FormatError):
        return []


def _forget_in_state(config: Config, name: str) -> None:
    """Drop attachment *name* from the state file of a daemon that is gone; other entries stay as they are."""
    try:
        with open(config.state_file, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return
    if isinstance(doc, dict) and isinstance(doc.get("attachments"), list):
        doc["attachments"] = [r for r in doc["attachments"] if not (isinstance(r, dict) and r.get("name") == name)]
        write_atomically(config.state_file, json.dumps(doc, indent=1).encode())


def umount_target(config: Config, target: str) -> dict:
    """Undo mount or export at *target*; works after the daemon was killed too."""
    target = os.path.abspath(target)
    done: list[str] = []
    loops: list[str] = []
    dms: list[str] = []  # switchable devices (serve/dmswitch.py): removed after the unmount, before the loops
    entry = next((m for m in mountinfo.mounts() if m.mountpoint == target), None)
    if entry is not None:
        if entry.source.startswith("/dev/loop"):
            loops.append(entry.source)
        if re.fullmatch(f"/dev/mapper/{dmswitch.NAME}", entry.source):
            dms.append(os.path.basename(entry.source))
        try:
            syscmd.umount_blocking(target)
        except BusyError:
            raise BusyError(f"{target} is busy: close the programs using it first") from None
        except LazyfsError:
            syscmd.umount_blocking(target, lazy=True)  # a dead daemon's device: detach lazily
        done.append(f"unmounted {target}")
    att = _attachment_for(config, target)
    if att is not None and att.front_end.dm and att.front_end.dm not in dms:
        dms.append(att.front_end.dm)
    for dm in dms:
        if syscmd.run_steps_blocking(dmswitch.remove_steps(dm)):
            done.append(f"removed {dmswitch.device_path(dm)}")
    if att is not None and att.front_end.loop and att.front_end.loop not in loops:
        loops.append(att.front_end.loop)
    for dev in loops:
        if os.path.exists(syscmd.loop_sysfs(dev)):
            try:
                syscmd.losetup_detach_blocking(dev)
            except LazyfsError:
                if os.path.exists(syscmd.loop_sysfs(dev)):
                    raise
                continue  # it cleared itself meanwhile (a loop device under a removed switchable one)
            done.append(f"detached {dev}")
    link = os.path.join(target, IMAGE_NAME)
    if os.path.islink(link) and os.readlink(link).startswith(config.export_dir + os.sep):
        os.unlink(link)
        done.append(f"removed {link}")
    if att is not None:
        try:
            call(config.socket_path, "detach", name=att.name)
        except NotFoundError:
            _forget_in_state(config, att.name)
        done.append(f"detached image {att.name}")
    if mountinfo.is_mountpoint(config.export_dir):
        with contextlib.suppress(BusyError):  # busy: a live (or starting) daemon owns the export
            with daemon_lock(config.run_dir):
                if not _state_records(config):  # nothing left for a next daemon: the kept connection goes too
                    keeper.release(keeper.socket_path(config.run_dir))
                syscmd.clear_stale_export_blocking(config.export_dir)  # a killed daemon's FUSE mount, unless kept
                if not mountinfo.is_mountpoint(config.export_dir):
                    done.append(f"removed the dead daemon's export {config.export_dir}")
    if not done:
        raise NotFoundError(f"nothing of lazyfs is mounted or exported at {target}")
    return {"target": target, "done": done}


def commit_target(config: Config, target: str, out: str, plain_http: Sequence[str] = ()) -> dict:
    """Freeze the writable ext4 at *target*, commit its writable layer as *out*, thaw.

    *plain_http*: registries the daemon speaks plain HTTP to for this commit (*out* may be on one).
    """
    att = _attachment_for(config, target)
    if att is None:
        raise NotFoundError(f"no lazyfs image is mounted at {os.path.abspath(target)}")
    frozen = False
    if mountinfo.is_mountpoint(target):
        subprocess.run(["sync", "-f", target], check=False)
        frozen = subprocess.run(["fsfreeze", "-f", target], capture_output=True).returncode == 0
    try:
        return call(config.socket_path, "commit", timeout=3600, name=att.name, out=out, plain_http=list(plain_http))
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "-u", target], check=False)


def stats(config: Config, target: str | None) -> dict:
    if target is None:
        return call(config.socket_path, "stats")
    att = _attachment_for(config, target)
    if att is None:
        raise NotFoundError(f"no lazyfs image is mounted at {os.path.abspath(target)}")
    return call(config.socket_path, "stats", name=att.name)
