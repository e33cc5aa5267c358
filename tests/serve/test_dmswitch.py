"""The device-mapper switch's steps (lazyfs/serve/dmswitch.py), driven against a model of dmsetup.

This host's kernel has no device-mapper, so these tests emulate it: `FakeDM` answers the
commands the steps yield the way dmsetup and the kernel do (a table per device, a suspended
flag, loop devices that clear themselves once nothing holds them) and records them. The real
kernel runs the same steps in tests/serve/test_dm_switch_guest.py, inside a qemu guest booted
with Debian's kernel, under a reader.
"""

from __future__ import annotations

import os

import pytest

from lazyfs.errors import FormatError, LazyfsError
from lazyfs.serve import dmswitch, syscmd
from lazyfs.serve.syscmd import CommandError

# real device nodes stand in for loop devices: the steps read their numbers with stat
OLD, NEW = "/dev/null", "/dev/zero"


def _numbers(dev: str) -> tuple[int, int]:
    rdev = os.stat(dev).st_rdev
    return os.major(rdev), os.minor(rdev)


class FakeDM:
    """dmsetup and losetup -d, as the kernel answers them."""

    def __init__(self, fail: dict[str, str] | None = None) -> None:
        self.tables: dict[str, str] = {}
        self.suspended: set[str] = set()
        self.held: dict[str, str] = {}  # loop device -> the dm device holding it
        self.autoclear: set[str] = set()
        self.detached: list[str] = []
        self.log: list[str] = []
        self.fail = fail or {}  # dmsetup verb -> stderr of a failure

    def _holder_of(self, table: str) -> str:
        maj_min = table.split()[3]
        return next(d for d in (OLD, NEW) if "%d:%d" % _numbers(d) == maj_min)

    def run(self, argv: tuple[str, ...]) -> str:
        if argv[:2] == ("losetup", "-d"):
            dev = argv[2]
            self.log.append(f"losetup -d {dev}")
            if dev in self.held.values() or dev in self.held:
                self.autoclear.add(dev)  # open: the kernel only marks it
            else:
                self.detached.append(dev)
            return ""
        assert argv[0] == "dmsetup" and argv[-1] == "--noudevsync", argv
        verb = argv[1]
        name = next(a for a in argv[2:] if a.startswith("lazyfs-") or a == "vg0-root")
        self.log.append(f"{verb} {name}")
        if verb in self.fail:
            raise CommandError(argv, 1, self.fail[verb])
        if verb == "create":
            assert name not in self.tables and "--readonly" in argv
            self.tables[name] = argv[argv.index("--table") + 1]
            self.held[self._holder_of(self.tables[name])] = name
        elif verb == "table":
            if name not in self.tables:
                raise CommandError(argv, 1, f"Device {name} not found")
            return self.tables[name] + "\n"
        elif verb == "suspend":
            self.suspended.add(name)
        elif verb == "reload":
            assert name in self.suspended, "reloaded while not suspended"
            self.pending = argv[argv.index("--table") + 1]
        elif verb == "resume":
            pending = getattr(self, "pending", None)
            if pending is not None:
                self._release(self._holder_of(self.tables[name]))
                self.tables[name] = pending
                self.held[self._holder_of(pending)] = name
                self.pending = None
            self.suspended.discard(name)
        elif verb == "remove":
            if name not in self.tables:
                raise CommandError(argv, 1, f"device-mapper: remove ioctl on {name}  failed: No such device or address")
            self._release(self._holder_of(self.tables.pop(name)))
        return ""

    def _release(self, dev: str) -> None:
        self.held.pop(dev, None)
        if dev in self.autoclear:
            self.autoclear.discard(dev)
            self.detached.append(dev)


def drive(steps, fake: FakeDM):
    """The CLI's runner (``run_steps_blocking``), with *fake* answering the commands."""
    real = syscmd.run_blocking
    syscmd.run_blocking = lambda argv, timeout, pass_fds: fake.run(tuple(argv))
    try:
        return syscmd.run_steps_blocking(steps)
    finally:
        syscmd.run_blocking = real


NAME = dmswitch.device_name("debian-12-0123456789")
SIZE = 64 << 20


def test_names_are_fixed_length_and_checked():
    assert NAME.startswith("lazyfs-") and len(NAME) == 23
    assert dmswitch.device_name("a") != dmswitch.device_name("b")
    with pytest.raises(FormatError, match="not a device-mapper name lazyfs made"):
        drive(dmswitch.remove_steps("vg0-root"), FakeDM())


def test_create_maps_the_whole_device_read_only_and_lets_the_loop_clear_itself():
    fake = FakeDM()
    path = drive(dmswitch.create_steps(NAME, OLD, SIZE), fake)
    assert path == f"/dev/mapper/{NAME}"
    assert fake.tables[NAME] == "0 %d linear %d:%d 0" % (SIZE // 512, *_numbers(OLD))
    assert fake.log == [f"create {NAME}", f"mknodes {NAME}", f"losetup -d {OLD}"]
    assert OLD in fake.autoclear and not fake.detached  # held: marked, not gone
    drive(dmswitch.remove_steps(NAME), fake)
    assert fake.detached == [OLD]  # gone with the device


def test_a_failed_create_leaves_no_device():
    fake = FakeDM(fail={"mknodes": "mknod failed"})
    with pytest.raises(CommandError, match="mknod failed"):
        drive(dmswitch.create_steps(NAME, OLD, SIZE), fake)
    assert NAME not in fake.tables
    with pytest.raises(FormatError):
        drive(dmswitch.create_steps(NAME, OLD, SIZE + 1), FakeDM())


def test_switch_suspends_reloads_and_resumes_then_both_loops_clear_themselves():
    fake = FakeDM()
    drive(dmswitch.create_steps(NAME, OLD, SIZE), fake)
    fake.log.clear()
    old = drive(dmswitch.switch_steps(NAME, NEW), fake)
    assert (old.major, old.minor) == _numbers(OLD) and old.sectors == SIZE // 512
    assert fake.log == [f"table {NAME}", f"suspend {NAME}", f"reload {NAME}", f"resume {NAME}", f"losetup -d {NEW}"]
    assert fake.tables[NAME] == "0 %d linear %d:%d 0" % (SIZE // 512, *_numbers(NEW))
    assert not fake.suspended
    assert fake.detached == [OLD]  # the old loop went when the switch let go of it
    assert NEW in fake.autoclear
    # a second switch onto the same device is a no-op
    fake.log.clear()
    assert drive(dmswitch.switch_steps(NAME, NEW), fake).minor == _numbers(NEW)[1]
    assert fake.log == [f"table {NAME}"]


@pytest.mark.parametrize("verb", ["reload", "resume"])
def test_a_failed_switch_never_leaves_the_device_suspended(verb):
    fake = FakeDM()
    drive(dmswitch.create_steps(NAME, OLD, SIZE), fake)
    fake.fail[verb] = f"{verb} ioctl failed"
    with pytest.raises(CommandError, match=f"{verb} ioctl failed"):
        drive(dmswitch.switch_steps(NAME, NEW), fake)
    assert fake.log[-1] == f"resume {NAME}"  # tried, whatever failed
    if verb == "reload":
        assert not fake.suspended  # resumed on the old table: readers go on through FUSE
        assert fake.tables[NAME].split()[3] == "%d:%d" % _numbers(OLD)


def test_switch_refuses_a_table_it_did_not_make():
    fake = FakeDM()
    fake.tables[NAME] = "0 100 striped 2 128 7:0 0 7:1 0"
    with pytest.raises(FormatError, match="not one linear target"):
        drive(dmswitch.switch_steps(NAME, NEW), fake)
    assert fake.log == [f"table {NAME}"]


def test_remove_of_a_device_already_gone_says_so():
    fake = FakeDM()
    assert drive(dmswitch.remove_steps(NAME), fake) is False
    fake.fail["remove"] = "device-mapper: remove ioctl failed: Device or resource busy"
    with pytest.raises(LazyfsError, match="busy"):
        drive(dmswitch.remove_steps(NAME), fake)


def test_parse_table():
    assert dmswitch.parse_table("0 2048 linear 7:3 0\n", NAME) == dmswitch.Linear(2048, 7, 3)
    for bad in ("", "0 2048 linear 7:3 8", "0 2048 linear 7:3 0\n2048 8 linear 7:4 0", "8 2048 linear 7:3 0"):
        with pytest.raises(FormatError):
            dmswitch.parse_table(bad, NAME)


def test_this_host_says_why_it_cannot_switch(tmp_path):
    (tmp_path / "misc").touch()
    (tmp_path / "control").touch()
    assert "no device-mapper loaded" in dmswitch.unavailable_reason(str(tmp_path / "none"), str(tmp_path / "control"))
    assert "none is missing" in dmswitch.unavailable_reason(str(tmp_path / "misc"), str(tmp_path / "none"))
    assert dmswitch.unavailable_reason(str(tmp_path / "misc"), str(tmp_path / "control")) is None
    if os.path.exists(dmswitch.MISC):
        pytest.skip("this host has device-mapper")
    print("device-mapper on this host:", dmswitch.unavailable_reason())
    assert dmswitch.unavailable_reason() is not None


def test_the_daemon_gives_up_on_a_mount_after_three_failed_switches(monkeypatch):
    """A switch that keeps failing is tried at most ``SWITCH_TRIES`` times (every hydration check
    would otherwise attach and detach a loop device, and log, forever)."""
    import types

    import trio

    from lazyfs.config import Config
    from lazyfs.serve import daemon as daemon_mod
    from lazyfs.serve.hydratedfiles import Hydrated
    from lazyfs.serve.state import FrontEnd

    att = types.SimpleNamespace(
        front_end=FrontEnd(mode="mount", target="/mnt/x", loop="/dev/loop0", loop_route="buffered", dm=NAME),
        opened=types.SimpleNamespace(image=types.SimpleNamespace(manifest=types.SimpleNamespace(digest="sha256:" + "a" * 64))),
        device=types.SimpleNamespace(size=SIZE))
    tries = []

    async def failing_attach(path, read_only=False, direct_io=True):
        tries.append(path)
        raise LazyfsError("losetup: no free loop device")

    monkeypatch.setattr(daemon_mod.hydrated, "existing", lambda root, manifest, size: Hydrated("/h.img", size, manifest))
    monkeypatch.setattr(daemon_mod.system, "losetup_attach", failing_attach)
    d = daemon_mod.Daemon(Config(), types.SimpleNamespace(attachments={"x": att}), fs=None)

    async def main():
        return [await d.switch_to_hydrated("x") for _ in range(5)]

    assert trio.run(main) == [False] * 5
    assert tries == ["/h.img"] * daemon_mod.SWITCH_TRIES == ["/h.img"] * 3
    assert att.front_end.loop_route == "buffered"  # still on FUSE, and recorded so
