"""The host daemon: FUSE export of every attached image, control API, metrics, restart state."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import trio

from lazyfs import __version__
from lazyfs.config import Config
from lazyfs.durable import write_atomically
from lazyfs.errors import ConfigError, FormatError, LazyfsError, NotFoundError
from lazyfs.image.commit import commit_writable
from lazyfs.nursery import open_nursery
from lazyfs.serve import dmswitch, hydrated, malloc, system
from lazyfs.serve.controlserver import serve_control
from lazyfs.serve.fusekernel import takeover
from lazyfs.serve.fusekernel.exports import ExportFS
from lazyfs.serve.fusekernel.protocol import ROOT_ID, notify_inval_entry
from lazyfs.serve.fusekernel.session import Session
from lazyfs.serve.host import Host
from lazyfs.serve.hydrate import HydratePolicy
from lazyfs.serve.singleton import daemon_lock
from lazyfs.serve.state import IMAGE_NAME, AttachmentRecord, FrontEnd, LoadedState, decode_state, encode_state

log = logging.getLogger("lazyfs.daemon")

FRESH_INODES = 1 << 32  # where a takeover without recorded inode numbers allocates from
SWITCH_TRIES = 3  # failed moves of one mount onto its hydrated file before the daemon stops trying


class Daemon:
    """Owns the Host and the FUSE export; answers control requests."""

    def __init__(self, config: Config, host: Host, fs: ExportFS, nursery: trio.Nursery | None = None,
                 load_config: Callable[[], Config] | None = None) -> None:
        self.config, self.host, self.fs = config, host, fs
        self.nursery = nursery  # runs TCMU handlers
        self.load_config = load_config or (lambda: config)  # re-reads the config file, for reloads
        self.luns: dict[str, str] = {}  # TCMU device name -> attachment name
        self.stopping = trio.Event()
        self.handover = False  # stop serving but leave the FUSE connection to the next daemon
        # set while the daemon restores the state file's attachments: requests other than ping wait for it
        self.restoring: trio.Event | None = None
        self._state_lock = trio.Lock()  # orders state-file saves (local disk only; nothing else waits on it)
        self.switch_failures: dict[str, int] = {}  # attachment name -> failed moves onto its hydrated file

    # ------------------------------------------------------------ state

    def _records(self) -> list[AttachmentRecord]:
        return [AttachmentRecord(name=a.name, image=a.ref, writable_dir=a.writable_dir,
                                 kind=a.device.writable.kind if a.device.writable else None,
                                 plain_http=a.plain_http, front_end=a.front_end,
                                 manifest=a.opened.image.manifest.digest,
                                 hydrate=False if a.hydrate is None else a.hydrate.to_json() or True,
                                 # a daemon taking over the FUSE connection must give each export
                                 # the inode numbers the kernel already knows it by
                                 inode=self.fs.inode_of(a.name) if a.name in self.fs.names() else None,
                                 backing_id=self.fs.backing_id_of(a.name))
                for a in self.host.attachments.values()]

    async def save_state(self) -> None:
        """Write the attachments to the state file (in a worker thread: it fsyncs).

        Saves run one at a time and each takes the records when its turn comes, so the file
        always ends with the latest state, whatever order the saves were asked in.
        """
        async with self._state_lock:
            doc = encode_state(self._records(), next_inode=self.fs.next_inode,
                               handle_generation=self.fs.handle_generation)
            with trio.CancelScope(shield=True):  # a cancelled save must not leave a half-done write racing the next
                await trio.to_thread.run_sync(self._write_state, doc)

    def _write_state(self, doc: bytes) -> None:
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        write_atomically(self.config.state_file, doc)

    async def restore(self, state: LoadedState | None = None) -> None:
        """Attach again what was attached when the previous daemon stopped or died (*state*: the
        state file as read at start). Each export gets the inode numbers it had, so a daemon taking
        over the FUSE connection serves the kernel's cached inodes and open handles."""
        if state is None:
            state = await trio.to_thread.run_sync(read_state, self.config)
        if not state.records and not state.skipped:
            return
        # all at once: one image whose registry stalls does not hold up the others
        async with open_nursery() as nursery:
            for rec in state.records:
                nursery.start_soon(self._restore_one, rec)
        await self.save_state()

    async def _restore_one(self, rec: AttachmentRecord) -> None:
        if rec.front_end.tcmu is not None:
            return await self._restore_tcmu(rec)
        try:
            await self.attach(rec.image, rec.name, writable=rec.writable_dir is not None,
                              writable_dir=rec.writable_dir, kind=rec.kind or "sparse",
                              front_end=rec.front_end, plain_http=rec.plain_http, save=False,
                              manifest=rec.manifest, hydrate=rec.hydrate, inode=rec.inode,
                              backing_id=rec.backing_id)
            log.info("restored attachment %s (%s)", rec.name, rec.image)
        except LazyfsError as exc:
            log.error("could not restore attachment %s: %s", rec.name, exc)

    async def _restore_tcmu(self, rec: AttachmentRecord) -> None:
        """Serve a TCMU LUN again: take over its kept uio fd (the LUN never went away: readers
        only waited), or, when nobody kept it, open its uio device again. Never torn down here:
        removing a LUN with commands on its ring blocks until they are answered."""
        from lazyfs.serve.tcmu import configfs, keep

        lun = rec.front_end.tcmu
        block_size = rec.front_end.tcmu_block_size or 512
        try:
            att = await self.host.attach(rec.image, rec.name, writable=rec.writable_dir is not None,
                                         writable_dir=rec.writable_dir, kind=rec.kind or "sparse",
                                         front_end=rec.front_end, plain_http=rec.plain_http, manifest=rec.manifest)
        except LazyfsError as exc:
            log.error("could not restore TCMU LUN %s (%s): %s", lun, rec.image, exc)
            return
        try:
            kept = await trio.to_thread.run_sync(keep.take, self.config.run_dir, lun)
            if kept is None:
                # nobody kept the fd (the keeper was killed too): the kernel keeps the device and
                # its ring across the close, and the owner is provably dead (we hold the daemon
                # lock), so open it again
                kept = await trio.to_thread.run_sync(configfs.reopen, lun)
            if kept is None:
                raise NotFoundError(f"its uio device is gone or busy; `lazyfs tcmu detach {lun}` removes "
                                    "what is left of it")
            fd, _uio, kind = kept
            await configfs.adopt(att.device, lun, fd, nursery=self.nursery, block_size=block_size)
            log.info("restored TCMU LUN %s (%s): took over its uio fd from the %s", lun, rec.image, kind)
            if kind == "uio device":  # keep it from now on
                await trio.to_thread.run_sync(self._keeper_for(lun), self._adopted_fd(lun), _uio)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self.host.detach(att.name, save=False)
            if isinstance(exc, LazyfsError):
                log.error("could not restore TCMU LUN %s (%s): %s", lun, rec.image, exc)
                return
            raise
        self.luns[lun] = att.name

    @staticmethod
    def _adopted_fd(lun: str) -> int:
        from lazyfs.serve.tcmu import configfs

        return configfs.attached(lun).uio.fileno()

    def _keeper_for(self, lun: str) -> Callable[[int, str], None]:
        from lazyfs.serve.tcmu import keep

        return lambda fd, uio: keep.keep(self.config.run_dir, lun, fd, uio)

    # ------------------------------------------------------------ operations

    def path_of(self, name: str) -> str:
        return os.path.join(self.config.export_dir, name, IMAGE_NAME)

    async def attach(self, image: str, name: str | None = None, writable: bool = False, writable_dir: str | None = None,
                     kind: str = "sparse", front_end: FrontEnd | dict | None = None, save: bool = True,
                     record_trace: bool | None = None,
                     plain_http: list[str] | tuple[str, ...] = (), manifest: str | None = None,
                     hydrate: object = None, inode: int | None = None, backing_id: int = 0) -> dict:
        """Attach and export *image*. *hydrate*: None (the config's default), false, true, or
        ``{"rate": BYTES_PER_S}`` / ``{"deadline": SECONDS}`` / ``{"deadline_at": UNIX_TIME}``.
        *manifest* pins the manifest digest and *inode* the export's inode numbers (restores),
        *backing_id* its passthrough backing file on a taken-over connection."""
        if not isinstance(front_end, FrontEnd):
            front_end = FrontEnd.from_json(front_end or {})
        if manifest is not None and not isinstance(manifest, str):
            raise ConfigError(f"manifest must be a digest string, not {manifest!r}")
        policy = hydrate if hydrate is None else HydratePolicy.from_request(hydrate, time.time()) or False
        att = await self.host.attach(image, name, writable=writable, writable_dir=writable_dir, kind=kind,
                                     record_trace=record_trace, plain_http=_hosts(plain_http), manifest=manifest,
                                     hydrate=policy, front_end=front_end)
        try:
            # a backing id is only meaningful on the very connection it was registered with
            self.fs.add(att.name, att.device, inode=inode, backing_id=backing_id if self.fs.adopt_handles else 0)
        except LazyfsError:
            with trio.CancelScope(shield=True):
                await self.host.detach(att.name, save=False)
            raise
        if save:
            await self.save_state()
        await self.pass_through(att.name)
        if att.device.read_only:
            self.nursery.start_soon(self._open_hint_file, att.name)
        return {**att.describe(), "path": self.path_of(att.name)}

    async def _open_hint_file(self, name: str) -> None:
        """Local readahead for read-only export *name* (docs/warm.md §4), in the background: on a
        taken-over connection the open waits until the session serves again."""
        why = await self.fs.open_hint_file(name, self.path_of(name))
        if why is not None:
            log.info("no local readahead for %s: %s", name, why)

    async def _hydrated_file(self, att) -> hydrated.Hydrated | None:
        """The complete hydrated file of attachment *att*'s image, if there is one."""
        return await trio.to_thread.run_sync(hydrated.existing, self.config.cache_root,
                                             att.opened.image.manifest.digest, att.device.size)

    async def pass_through(self, name: str) -> bool:
        """Have the kernel serve opens of read-only export *name* from its image's hydrated file,
        if there is one (FUSE passthrough, docs/warm.md §3). False when not (yet) possible."""
        att = self.host.attachments.get(name)
        if att is None or not att.device.read_only or name not in self.fs.names():
            return False
        if self.fs.backing_id_of(name):
            return True
        found = await self._hydrated_file(att)
        if found is None:
            return False
        try:
            return await self.fs.pass_through(name, found.path, self.save_state)
        except LazyfsError as exc:
            log.warning("export %s not passed through: %s", name, exc)
            return False

    async def switch_to_hydrated(self, name: str) -> bool:
        """Move the running mount of read-only attachment *name* onto its image's hydrated file,
        if it is switchable and the file exists (serve/dmswitch.py): a loop device on the file,
        and its device-mapper table swapped in place. False when not (yet) possible; a failure
        is logged, and tried again at most ``SWITCH_TRIES`` times."""
        att = self.host.attachments.get(name)
        if att is None or att.front_end.dm is None or att.front_end.loop_route == "hydrated":
            return False
        if self.switch_failures.get(name, 0) >= SWITCH_TRIES:
            return False
        found = await self._hydrated_file(att)
        if found is None:
            return False
        dm, target = att.front_end.dm, att.front_end.target
        dev = None
        try:
            dev = await system.losetup_attach(found.path, read_only=True, direct_io=True)
            # never cancelled between suspend and resume: a device left suspended hangs its readers
            # (every command has a timeout)
            with trio.CancelScope(shield=True):
                old = await system.run_steps(dmswitch.switch_steps(dm, dev))
        except LazyfsError as exc:
            self.switch_failures[name] = self.switch_failures.get(name, 0) + 1
            log.warning("the mount at %s stays on FUSE: moving %s onto %s failed: %s", target, dm, found.path, exc)
            if dev is not None:
                with trio.CancelScope(shield=True):
                    with contextlib.suppress(LazyfsError):
                        await system.losetup_detach(dev)
            return False
        if self.host.attachments.get(name) is att:
            att.front_end = att.front_end.updated(FrontEnd(loop=dev, loop_route="hydrated"))
            await self.save_state()
        log.info("audit: moved the mount at %s (%s) from %d:%d onto %s (%s), reads no longer reach FUSE",
                 target, dm, old.major, old.minor, found.path, dev)
        return True

    async def after_hydration_check(self) -> None:
        """What the daemon does after each check for hydrated files, for every attachment:
        ``pass_through`` its export if not passed through yet (those open at the last try are
        tried again: the kernel only lets an inode switch while nothing holds it open), and
        ``switch_to_hydrated`` its mount."""
        for name in list(self.host.attachments):
            await self.pass_through(name)
            await self.switch_to_hydrated(name)

    async def detach(self, name: str) -> dict:
        self.switch_failures.pop(name, None)
        if name not in self.host.attachments:
            raise NotFoundError(f"no image attached as {name!r}")
        await self.fs.remove(name, wait=10.0)
        try:
            await self.host.detach(name)  # detached even if its last flush fails (which is reported)
        finally:
            await self.save_state()
        return {"detached": name}

    async def mark(self, name: str, front_end: dict) -> dict:
        """Record what a front end made of attachment *name* (the fields *front_end* sets)."""
        changes = FrontEnd.from_json(front_end)
        att = self.host.attachments.get(name)
        if att is None:
            raise NotFoundError(f"no image attached as {name!r}")
        att.front_end = att.front_end.updated(changes)
        await self.save_state()
        return att.describe()

    async def commit(self, name: str, out: str, plain_http: list[str] | tuple[str, ...] = ()) -> dict:
        att = self.host.attachments.get(name)
        if att is None:
            raise NotFoundError(f"no image attached as {name!r}")
        if att.device.writable is None:
            raise ConfigError(f"{name} is attached read-only: nothing to commit")
        async with self.host.registry_opener(att.plain_http + _hosts(plain_http)) as opener:
            # writes wait only while the layer is read out, not while the registry is talked to
            result = await commit_writable(opener, att.opened, att.device.writable, out, hold=att.device.writes_held)
        log.info("audit: commit %s image=%s -> %s (%s)", name, att.ref, out, result["manifest"])
        return result

    async def tcmu_attach(self, image: str, name: str, writable: bool = False, block_size: int = 512,
                          writable_dir: str | None = None, plain_http: list[str] | tuple[str, ...] = ()) -> dict:
        """Serve *image* as a SCSI disk through target_core_user (like overlaybd-tcmu)."""
        from lazyfs.serve.tcmu import configfs, keep

        configfs.validate_name(name)
        configfs.check_available()  # a clear error before anything is attached
        if block_size not in (512, 1024, 2048, 4096):
            raise ConfigError(f"block_size must be 512, 1024, 2048 or 4096, not {block_size!r}")
        att = await self.host.attach(image, f"tcmu-{name}", writable=writable, writable_dir=writable_dir,
                                     front_end=FrontEnd(tcmu=name, tcmu_block_size=block_size),
                                     plain_http=_hosts(plain_http))
        try:
            # the uio fd is kept (like the FUSE connection): a restarted daemon takes the LUN over
            device = await configfs.attach(att.device, name, nursery=self.nursery, block_size=block_size,
                                           keep=self._keeper_for(name))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.host.detach(att.name, save=False)
                await trio.to_thread.run_sync(keep.release, self.config.run_dir, name)
            raise
        self.luns[name] = att.name
        await self.save_state()  # a restarted daemon serves the LUN again
        log.info("audit: tcmu attach %s image=%s disk=%s", name, image, device.disk)
        return {**att.describe(), "disk": device.disk}

    async def tcmu_detach(self, name: str) -> dict:
        from lazyfs.serve.tcmu import configfs, keep

        await trio.to_thread.run_sync(keep.release, self.config.run_dir, name)  # detached for good
        await configfs.detach(name)
        attachment = self.luns.pop(name, None)
        if attachment in self.host.attachments:
            await self.host.detach(attachment)
        await self.save_state()
        log.info("audit: tcmu detach %s", name)
        return {"detached": name}

    async def reload_registries(self) -> dict:
        """Re-read the config file and use its registries and hosts_dir (SIGHUP, ``reload``)."""
        config = await trio.to_thread.run_sync(self.load_config)
        return await self.host.reload_registries(config)

    async def handle(self, op: str, args: dict) -> object:
        if "extra" in args and "front_end" not in args:  # what a client from before state version 2 sends
            args = {**args, "front_end": args["extra"]}
            del args["extra"]
        if op == "ping":
            return {"pid": os.getpid(), "version": __version__, "export_dir": self.config.export_dir,
                    "restoring": self.restoring is not None and not self.restoring.is_set()}
        if self.restoring is not None:
            # an attach, list, umount or stats during the restore sees every restored image
            await self.restoring.wait()
        if op == "attach":
            return await self.attach(**_only(args, "image", "name", "writable", "writable_dir", "kind", "front_end", "record_trace",
                                             "plain_http", "hydrate"))
        if op == "detach":
            return await self.detach(**_only(args, "name"))
        if op == "list":
            return [{**a.describe(), "path": self.path_of(a.name)} for a in self.host.attachments.values()]
        if op == "stats":
            name = args.get("name")
            if name is None:
                return self.host.statistics()
            if name not in self.host.attachments:
                raise NotFoundError(f"no image attached as {name!r}")
            return {**self.host.attachments[name].statistics(), "scheduler": self.host.scheduler.statistics()}
        if op == "fuse-stats":
            return self.fs.statistics()
        if op == "mark":
            return await self.mark(**_only(args, "name", "front_end"))
        if op == "commit":
            return await self.commit(**_only(args, "name", "out", "plain_http"))
        if op == "trace-finish":
            att = self.host.attachments.get(args.get("name"))
            if att is None:
                raise NotFoundError(f"no image attached as {args.get('name')!r}")
            await self.host.finish_trace(att)
            return att.trace
        if op == "hydrate-file":
            answer = await hydrated.control(self.host, args.get("name"))
            if answer.get("path"):
                answer["passthrough"] = await self.pass_through(args["name"])
                answer["switched"] = await self.switch_to_hydrated(args["name"])
            return answer
        if op == "tcmu-attach":
            return await self.tcmu_attach(**_only(args, "image", "name", "writable", "block_size", "writable_dir",
                                                  "plain_http"))
        if op == "tcmu-detach":
            return await self.tcmu_detach(**_only(args, "name"))
        if op == "reload":
            return await self.reload_registries(**_only(args))
        if op == "stop":
            self.stopping.set()
            return {"stopping": True}
        raise ConfigError(f"unknown control operation {op!r}")


def _hosts(value: object) -> tuple[str, ...]:
    """A request's ``plain_http``: a list of registry hosts."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(h, str) and h for h in value):
        raise ConfigError(f"plain_http must be a list of registry hosts, not {value!r}")
    return tuple(value)


def _only(args: dict, *names: str) -> dict:
    unknown = set(args) - set(names)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(sorted(unknown))}")
    return args


def secure_dirs(config: Config) -> None:
    """The host's directories, private to the daemon's user at every start (0700; see docs/trust.md).

    Images can be private, so no other local user may list or read the control socket,
    the exports, the chunk cache or writable layers (and the daemon's umask keeps its files 0600).
    """
    for path in (config.run_dir, config.cache_root, config.writable_root):  # lazyfs's own: forced
        system.private_dir(path)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)  # may be shared (e.g. /var/lib/lazyfs): made, not forced
    if not system.is_mountpoint(config.export_dir):  # a stale FUSE mount is cleared first
        system.private_dir(config.export_dir)


async def reload_on_sighup(daemon: Daemon, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Reload the registry configuration on every SIGHUP; a bad config is logged and changes nothing."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            try:
                await daemon.reload_registries()
            except LazyfsError as exc:
                log.error("SIGHUP: registries not reloaded: %s", exc)


async def run_daemon(config: Config, load_config: Callable[[], Config] | None = None) -> None:
    os.makedirs(config.run_dir, mode=0o700, exist_ok=True)
    # Before any mount or socket: a second daemon must not abort the first one's live FUSE
    # session or unlink its socket. The lock lives as long as this process.
    with daemon_lock(config.run_dir):
        await _run_daemon_locked(config, load_config)


async def _run_daemon_locked(config: Config, load_config: Callable[[], Config] | None) -> None:
    log.info("lazyfs daemon %d (version %s) starting for %s", os.getpid(), __version__, config.run_dir)
    # said once this daemon owns the run dir: a second daemon's whole output is its one error line
    log.info("malloc settings made: %s", " ".join(f"{k}={v}" for k, v in malloc.applied.items()) or "none")
    # a killed daemon's FUSE mount answers ENOTCONN (or is kept alive by the fd keeper):
    # secure_dirs skips it; it is taken over, or cleared and mounted afresh
    await trio.to_thread.run_sync(secure_dirs, config)
    # a sandboxed daemon's fresh mount namespace holds copies of the images' mounts: they would
    # keep the exports open after `lazyfs umount` in the host's namespace
    for mountpoint in await trio.to_thread.run_sync(system.drop_copied_loop_mounts, config.export_dir):
        log.info("detached the copy of %s in the daemon's own mount namespace", mountpoint)
    state = await trio.to_thread.run_sync(read_state, config)
    async with Host.open(config) as host:
        # a generation of file handle ids of its own: the kernel may still hold the previous daemon's
        fs = ExportFS(next_inode=state.next_inode or 2, handle_generation=state.handle_generation + 1,
                      native_reads=config.fuse_native_reads)
        # the threads' C path asks; at least 64 KiB: it counts reads in one byte per window
        fs.local_readahead = max(config.local_readahead, 64 << 10) if config.local_readahead and config.fuse_threads else 0
        session, taken_over = await takeover.connect(config.run_dir, config.export_dir, fs, system.clear_stale_export)
        # before any loop device opens an exported file: a file takes its readahead when opened
        fs.readahead_kb, why = await trio.to_thread.run_sync(system.set_readahead, config.export_dir,
                                                             config.export_readahead)
        if why:
            log.warning("readahead of the exported files not set to %d KiB: %s", config.export_readahead >> 10, why)
        full_stop = False  # only a deliberate stop ends the connection; a crash or a handover leaves it kept
        try:
            async with open_nursery() as nursery:
                daemon = Daemon(config, host, fs, nursery, load_config)
                # The control socket answers from now on, however long the restore takes (a
                # registry may be away): ping says "restoring", other requests wait for the restore.
                daemon.restoring = trio.Event()
                await nursery.start(serve_control, config.socket_path, daemon.handle)
                try:
                    if taken_over:
                        # The kernel knows the exports by the inode numbers and handles the previous
                        # daemon gave: restore them before answering anything, then have the requests
                        # it left unanswered sent again. Until then readers wait; they get no error.
                        if state.next_inode is None:  # numbers not recorded (an older state file): never alias
                            fs.skip_inodes_to(FRESH_INODES)
                        await daemon.restore(state)
                        for rec in state.records:
                            if rec.inode is None and rec.name in fs.names():
                                # restored under a new number: drop the kernel's dentry so the next lookup finds it
                                session.notify(notify_inval_entry(ROOT_ID, rec.name.encode()))
                        session.resend()
                        await nursery.start(_serve_session, session, config.fuse_threads)
                    else:
                        await nursery.start(_serve_session, session, config.fuse_threads)
                        await daemon.restore(state)
                finally:
                    daemon.restoring.set()
                if config.metrics_address:
                    # imported only here: prometheus_client is a noticeable part of the daemon's
                    # start, which every cold `lazyfs mount` waits for (BENCHMARKS.md, issue 14)
                    from lazyfs.serve.metrics import serve_metrics

                    await nursery.start(serve_metrics, config.metrics_address, host, fs)
                await nursery.start(reload_on_sighup, daemon)
                if config.hydrated_max_bytes > 0:
                    await nursery.start(hydrated.watch, host, config.hydrated_check_interval, daemon.after_hydration_check)
                if config.registry_probe_interval > 0:
                    await nursery.start(host.probe_registries, config.registry_probe_interval)
                log.info("lazyfs daemon %d ready: export %s, control %s%s", os.getpid(), config.export_dir,
                         config.socket_path, " (took over the FUSE connection)" if taken_over else "")
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async def wait_signal():
                        async for _ in signals:
                            # a signal with images attached is a restart or an upgrade: hand over
                            daemon.handover = bool(host.attachments)
                            daemon.stopping.set()
                            return
                    nursery.start_soon(wait_signal)
                    await daemon.stopping.wait()
                if daemon.handover:
                    log.info("lazyfs daemon handing over: the FUSE connection and %d image(s) stay for the next "
                             "daemon", len(host.attachments))
                    await fs.close_hint_files()
                    nursery.cancel_scope.cancel()  # requests being answered are resent to the next daemon
                    return
                log.info("lazyfs daemon stopping")
                full_stop = True
                for lun in list(daemon.luns):
                    try:
                        await daemon.tcmu_detach(lun)
                    except LazyfsError as exc:
                        log.warning("TCMU device %s: %s", lun, exc)
                for name in list(host.attachments):
                    try:
                        await fs.remove(name, wait=2.0)
                    except LazyfsError as exc:
                        log.warning("export %s still open at shutdown: %s", name, exc)
                    await host.detach(name, save=True)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if full_stop:
                    await trio.to_thread.run_sync(takeover.release, session, config.run_dir)
                    log.info("unmounted %s", config.export_dir)
                else:
                    takeover.leave(session)


async def _serve_session(session: Session, threads: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await session.serve(threads=threads, task_status=task_status)


def read_state(config: Config) -> LoadedState:
    """The state file (no records if there is none; a damaged one is logged and ignored)."""
    try:
        with open(config.state_file, "rb") as f:
            state = decode_state(f.read(), f"state file {config.state_file}")
    except FileNotFoundError:
        return LoadedState((), ())
    except (OSError, FormatError) as exc:
        log.error("ignoring damaged state file %s: %s", config.state_file, exc)
        return LoadedState((), ())
    for problem in state.skipped:
        log.error("could not restore an attachment: %s", problem)
    return state


def main(config: Config, load_config: Callable[[], Config] | None = None) -> int:
    """Run the daemon; *load_config* re-reads the configuration for reloads (SIGHUP, ``reload``)."""
    os.umask(0o077)  # every file the daemon makes (cache, state, writable layers) is its user's alone
    logging.basicConfig(level=getattr(logging, config.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    malloc.tune()  # before any thread: big buffers stay on a bounded heap (lazyfs/serve/malloc.py)
    if config.log_level != "debug":  # httpx logs every request's URL at INFO, presigned redirects included
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    trio.run(run_daemon, config, load_config)
    return 0
