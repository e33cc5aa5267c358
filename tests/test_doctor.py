"""`lazyfs doctor`: the judge on table cases, and the command on this very host and in namespaces.

The host tests compare the report with what simple tools say on their own (zcat of the kernel
config, /sys/module, losetup -f, which), so a probe that lies shows up as a disagreement.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from lazyfs import doctor, hostprobe
from lazyfs.config import Config
from lazyfs.doctor import DaemonFacts, Status
from lazyfs.hostprobe import HostFacts, Kernel, Outcome, PathFacts
from tests.conftest import require_fuse, require_loop, require_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30

# ---------------------------------------------------------------- the judge, on values


def _dir(path: str, **kw) -> PathFacts:
    base = dict(path=path, exists=True, probed=path, fstype="ext4", mountpoint="/", read_only=False, writable=True,
                free_bytes=100 * GiB, total_bytes=200 * GiB)
    return PathFacts(**{**base, **kw})


GOOD_KERNEL = Kernel(
    release="6.18.0", version=(6, 18),
    config={"CONFIG_FUSE_PASSTHROUGH": "y", "CONFIG_FUSE_IO_URING": "y", "CONFIG_TCM_USER2": "y",
            "CONFIG_FS_VERITY": "y", "CONFIG_EXT4_FS": "y"},
    config_source="/proc/config.gz", filesystems=frozenset({"fuse", "fusectl", "ext4", "overlay"}),
    modules=frozenset({"fuse", "loop", "target_core_user", "tcm_loop", "kvm"}), fuse_uring_enabled=True,
)
GOOD = HostFacts(
    kernel=GOOD_KERNEL, euid=0, fuse_device=Outcome(True, "/dev/fuse opens"), pyfuse3=Outcome(True, "pyfuse3 3.5.0"),
    fusectl=Outcome(True, "fusectl mounted"), loop=Outcome(True, "/dev/loop-control hands out /dev/loop0"),
    io_uring=Outcome(True, "io_uring_setup works"), io_uring_disabled=0, kvm=Outcome(True, "/dev/kvm opens"),
    cpu_virtualization=True, configfs_target=True, containerd_socket=True,
    tools={t: f"/usr/bin/{t}" for t in hostprobe.MOUNT_TOOLS + ("containerd", "runc", "podman", "qemu-system-x86_64")},
    versions={"podman": "4.3.1"},
    paths={"run_dir": _dir("/run/lazyfs"), "state_dir": _dir("/var/lib/lazyfs"),
           "cache_root": _dir("/var/lib/lazyfs/cache"), "writable_root": _dir("/var/lib/lazyfs/writable")},
    verity=Outcome(True, "FS_IOC_ENABLE_VERITY works"),
    device_mapper=Outcome(True, "/dev/mapper/control and dmsetup"),
)
NO_DAEMON = DaemonFacts("/run/lazyfs/lazyfs.sock", False)
CONFIG = Config(cache_size=10 * GiB)


def _report(facts: HostFacts = GOOD, daemon: DaemonFacts = NO_DAEMON):
    return doctor.diagnose(facts, daemon, CONFIG)


def _check(report, topic: str):
    return next(c for c in report.checks if c.topic == topic)


def _paths(**changes) -> dict:
    return {**GOOD.paths, **changes}


def test_a_fully_equipped_host_passes_with_one_line_per_topic():
    report = _report()
    assert report.exit_status == 0 and report.mount_can_work
    assert {c.status for c in report.checks} <= {Status.OK, Status.UNUSED}
    topics = [c.topic for c in report.checks]
    assert len(topics) == len(set(topics))
    for topic in ("FUSE", "loop devices", "target_core_user", "fs-verity", "io_uring", "FUSE passthrough",
                  "FUSE_NOTIFY_RESEND", "FUSE over io_uring", "cache root", "writable root", "containerd",
                  "OCI runtime", "qemu", "podman", "daemon", "FUSE reads in C", "hydrated switch"):
        assert topic in topics
    lines = report.lines()
    assert lines[-1] == "lazyfs mount can work here."
    assert all("\n" not in line for line in lines)


def test_a_host_without_the_c_read_path_can_mount_and_is_told_the_cost():
    report = _report(dataclasses.replace(GOOD, native_reads=Outcome(False, "the C READ path is not built (x)")))
    check = _check(report, "FUSE reads in C")
    assert report.mount_can_work and check.status is Status.MISSING
    assert "not built" in check.text and "Python" in check.text
    off = doctor.diagnose(GOOD, NO_DAEMON, dataclasses.replace(CONFIG, fuse_native_reads=False))
    assert _check(off, "FUSE reads in C").status is Status.UNUSED


def test_a_host_without_device_mapper_can_mount_and_is_told_what_running_mounts_keep():
    topic = "hydrated switch"
    assert _check(_report(), topic).status is Status.OK
    missing = Outcome(False, "the kernel has no device-mapper loaded (/sys/class/misc/device-mapper is missing; modprobe dm_mod, if it is a module)")
    report = _report(dataclasses.replace(GOOD, device_mapper=missing))
    check = _check(report, topic)
    assert report.mount_can_work and check.status is Status.MISSING
    assert "no device-mapper" in check.text and "keeps reading through FUSE" in check.text
    for changes in ({"hydrated_switch": "off"}, {"hydrated_max_bytes": 0}):
        off = doctor.diagnose(GOOD, NO_DAEMON, dataclasses.replace(CONFIG, **changes))
        assert _check(off, topic).status is Status.UNUSED


def test_this_host_has_the_c_read_path():
    """scripts/setup.sh builds it: the probe finds it on a host that runs the tests."""
    assert hostprobe.probe_native_reads().ok, hostprobe.probe_native_reads().detail


FAILING = [
    ("not root", dataclasses.replace(GOOD, euid=1000), "root", "needs root"),
    ("no /dev/fuse", dataclasses.replace(GOOD, fuse_device=Outcome(False, "/dev/fuse: ENOENT (No such file)")), "FUSE",
     "/dev/fuse: ENOENT"),
    ("no pyfuse3", dataclasses.replace(GOOD, pyfuse3=Outcome(False, "pyfuse3 does not import: x")), "FUSE", "pyfuse3"),
    ("no fuse in the kernel", dataclasses.replace(GOOD, kernel=dataclasses.replace(
        GOOD_KERNEL, filesystems=frozenset({"ext4"}))), "FUSE", "CONFIG_FUSE_FS"),
    ("no loop", dataclasses.replace(GOOD, loop=Outcome(False, "/dev/loop-control: ENOENT")), "loop devices",
     "lazyfs mount cannot work"),
    ("no ext4", dataclasses.replace(GOOD, kernel=dataclasses.replace(
        GOOD_KERNEL, filesystems=frozenset({"fuse"}), config={"CONFIG_EXT4_FS": "n"})), "ext4", "no ext4"),
    ("no losetup", dataclasses.replace(GOOD, tools={**GOOD.tools, "losetup": None}), "tools", "losetup"),
    ("run dir read-only", dataclasses.replace(GOOD, paths=_paths(run_dir=_dir("/run/lazyfs", read_only=True,
                                                                               writable=False))),
     "run dir", "read-only"),
    ("state dir full", dataclasses.replace(GOOD, paths=_paths(state_dir=_dir("/var/lib/lazyfs", free_bytes=4096))),
     "state dir", "full"),
    ("cache root cannot be created", dataclasses.replace(GOOD, paths=_paths(cache_root=_dir(
        "/ro/cache", exists=False, probed="/ro", read_only=True, writable=False))), "cache root", "cannot create"),
]


@pytest.mark.parametrize("case, facts, topic, words", FAILING, ids=[c[0] for c in FAILING])
def test_a_missing_requirement_fails_the_report(case, facts, topic, words):
    report = _report(facts)
    check = _check(report, topic)
    assert check.status is Status.FAIL and words in check.text, check
    assert report.exit_status == 1
    assert report.failed == (check,)
    assert report.lines()[-1] == f"lazyfs mount cannot work here: {topic}."


DEGRADED = [
    ("cache root read-only but there", _paths(cache_root=_dir("/c", read_only=True, writable=False)), "cache root",
     Status.WARN, "fetched again"),
    ("cache disk full", _paths(cache_root=_dir("/c", free_bytes=1 << 20)), "cache root", Status.WARN, "fetched again"),
    ("cache limit above free space", _paths(cache_root=_dir("/c", free_bytes=2 * GiB)), "cache root", Status.WARN,
     "less than the 20 GiB cache limit"),  # cache_size + flat_cache_size: both disk tiers
    ("writable root read-only", _paths(writable_root=_dir("/w", read_only=True, writable=False)), "writable root",
     Status.MISSING, "--writable cannot work"),
]


@pytest.mark.parametrize("case, paths, topic, status, words", DEGRADED, ids=[c[0] for c in DEGRADED])
def test_degraded_but_mountable_hosts_pass_with_the_cost_said(case, paths, topic, status, words):
    report = _report(dataclasses.replace(GOOD, paths=paths))
    check = _check(report, topic)
    assert check.status is status and words in check.text, check
    assert report.exit_status == 0


def test_kernel_features_from_config_or_version():
    old = dataclasses.replace(GOOD_KERNEL, release="6.8.0", version=(6, 8), config=None, config_source=None,
                              fuse_uring_enabled=None)
    report = _report(dataclasses.replace(GOOD, kernel=old))
    for topic in ("FUSE passthrough", "FUSE_NOTIFY_RESEND", "FUSE over io_uring"):
        check = _check(report, topic)
        assert check.status is Status.MISSING and "6.8 <" in check.text, check
    new = dataclasses.replace(old, release="6.14.1", version=(6, 14))
    report = _report(dataclasses.replace(GOOD, kernel=new))
    assert _check(report, "FUSE over io_uring").status is Status.UNUSED
    assert _check(report, "FUSE_NOTIFY_RESEND").status is Status.OK  # the daemon uses it on takeover
    assert _check(report, "FUSE passthrough").status is Status.OK  # hydrated exports are passed through
    # a config saying "not set" wins over the version
    off = dataclasses.replace(GOOD_KERNEL, config={**GOOD_KERNEL.config, "CONFIG_FUSE_PASSTHROUGH": "n"})
    check = _check(_report(dataclasses.replace(GOOD, kernel=off)), "FUSE passthrough")
    assert check.status is Status.MISSING and "CONFIG_FUSE_PASSTHROUGH is not set" in check.text


def test_target_core_user_states():
    def tcmu(modules, config_value, configfs=True):
        kernel = dataclasses.replace(GOOD_KERNEL, modules=frozenset(modules),
                                     config={**GOOD_KERNEL.config, "CONFIG_TCM_USER2": config_value})
        return _check(_report(dataclasses.replace(GOOD, kernel=kernel, configfs_target=configfs)), "target_core_user")

    assert tcmu({"target_core_user", "tcm_loop"}, "m").status is Status.OK
    assert "modprobe target_core_user tcm_loop" in tcmu(set(), "m").text
    assert "CONFIG_TCM_USER2 is not set" in tcmu(set(), "n").text
    assert "modprobe tcm_loop" in tcmu({"target_core_user"}, "m").text
    assert "mount -t configfs" in tcmu({"target_core_user", "tcm_loop"}, "m", configfs=False).text
    for check in (tcmu(set(), "m"), tcmu(set(), "n")):
        assert check.status is Status.MISSING and "lazyfs tcmu attach cannot work" in check.text


def test_verity_states():
    def verity(config_value, outcome, fstype="ext4"):
        kernel = dataclasses.replace(GOOD_KERNEL, config={**GOOD_KERNEL.config, "CONFIG_FS_VERITY": config_value})
        paths = _paths(cache_root=_dir("/c", fstype=fstype))
        return _check(_report(dataclasses.replace(GOOD, kernel=kernel, verity=outcome, paths=paths)), "fs-verity")

    assert verity("y", Outcome(True, "works")).status is Status.UNUSED
    assert "CONFIG_FS_VERITY is not set" in verity("n", Outcome(False, "ENOTSUP")).text
    assert "tune2fs -O verity" in verity("y", Outcome(False, "FS_IOC_ENABLE_VERITY: ENOTSUP")).text
    assert "tune2fs" not in verity("y", Outcome(False, "FS_IOC_ENABLE_VERITY: ENOTTY"), fstype="tmpfs").text
    assert "not probed" in verity("y", None).text


def test_debian_guest_kernel_config_is_judged_right():
    """The real config of Debian's kernel (the qemu guests' kernel): TCMU and fs-verity as modules/built in."""
    configs = sorted(glob.glob("/boot/config-*"))
    if not configs:
        pytest.skip("no /boot/config-* on this host (linux-image-amd64 not installed)")
    with open(configs[-1]) as f:
        config = hostprobe.parse_kernel_config(f.read())
    release = os.path.basename(configs[-1]).removeprefix("config-")
    kernel = Kernel(release, hostprobe.parse_release(release), config, configs[-1],
                    frozenset({"fuse", "ext4", "overlay"}), frozenset({"fuse"}), None)
    report = _report(dataclasses.replace(GOOD, kernel=kernel, configfs_target=False, verity=None))
    assert config.get("CONFIG_TCM_USER2") == "m"
    assert "modprobe target_core_user tcm_loop" in _check(report, "target_core_user").text
    assert config.get("CONFIG_FS_VERITY") == "y"
    assert "CONFIG_FS_VERITY=y" in _check(report, "fs-verity").text


def test_kvm_and_daemon_states():
    pvm = dataclasses.replace(GOOD, cpu_virtualization=False,
                              kernel=dataclasses.replace(GOOD_KERNEL, modules=GOOD_KERNEL.modules | {"kvm_pvm"}))
    assert _check(_report(pvm), "KVM").status is Status.WARN and "PVM" in _check(_report(pvm), "KVM").text
    no_kvm = dataclasses.replace(GOOD, kvm=Outcome(False, "/dev/kvm: ENOENT"))
    assert _check(_report(no_kvm), "KVM").status is Status.MISSING
    assert _check(_report(GOOD), "KVM").status is Status.OK
    running = DaemonFacts("/s", True, pid=42, attached=2)
    assert _check(_report(daemon=running), "daemon").text == "pid 42 answers on /s, 2 images attached"
    stale = DaemonFacts("/s", True, error="no lazyfs daemon answers on /s")
    check = _check(_report(daemon=stale), "daemon")
    assert check.status is Status.WARN and "crashed" in check.text
    assert _report(daemon=stale).exit_status == 0  # mount clears a dead daemon's leftovers itself


def test_human_sizes():
    assert [doctor.human(n) for n in (0, 1000, 1536, 10 * GiB, 69.8 * GiB, 123 * GiB)] == [
        "0 B", "1000 B", "1.5 KiB", "10 GiB", "69.8 GiB", "123 GiB"]


# ---------------------------------------------------------------- the command, on this host


def _config_file(tmp_path, **fields) -> str:
    doc = {"run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state"), "cache_root": str(tmp_path / "cache"),
           "writable_root": str(tmp_path / "writable"), **fields}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _doctor(config: str, *prefix: str) -> tuple[int, dict, str]:
    cmd = [*prefix, sys.executable, "-m", "lazyfs.cli", "doctor", "--config", config]
    as_json = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    human = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert as_json.returncode == human.returncode, (as_json.stderr, human.stderr)
    assert "Traceback" not in as_json.stderr + human.stderr
    return as_json.returncode, json.loads(as_json.stdout), human.stdout


def _status(report: dict) -> dict[str, str]:
    return {c["topic"]: c["status"] for c in report["checks"]}


def _text(report: dict, topic: str) -> str:
    return next(c["text"] for c in report["checks"] if c["topic"] == topic)


def _kernel_config_line(option: str) -> str | None:
    """The option's line in this kernel's config, by zcat/grep (independent of lazyfs' parser)."""
    for source in ("/proc/config.gz", f"/boot/config-{os.uname().release}"):
        if os.path.exists(source):
            out = subprocess.run(["sh", "-c", f"zcat -f {source} | grep -E '^(# )?{option}[= ]'"],
                                 capture_output=True, text=True)
            return out.stdout.strip() or f"# {option} is not set"
    return None


def test_doctor_reports_this_host(tmp_path):
    require_root()
    require_fuse()
    require_loop()
    rc, report, human = _doctor(_config_file(tmp_path))
    status = _status(report)
    assert rc == 0 and report["mount_can_work"], human
    assert human.strip().endswith("lazyfs mount can work here.")
    assert os.uname().release in report["kernel"]
    for topic in ("root", "FUSE", "loop devices", "ext4", "tools", "run dir", "state dir", "cache root",
                  "writable root"):
        assert status[topic] == "ok", (topic, _text(report, topic))
    # every line of the human report is one check: status, topic, text
    lines = [line for line in human.splitlines()[2:-2] if line]
    assert [line.split()[0] for line in lines] == [c["status"] for c in report["checks"]]

    # target_core_user: missing on this host, and said why
    loaded = os.path.isdir("/sys/module/target_core_user")
    assert status["target_core_user"] == ("ok" if loaded and os.path.isdir("/sys/kernel/config/target") else "missing")
    tcmu_config = _kernel_config_line("CONFIG_TCM_USER2")
    if not loaded and tcmu_config == "# CONFIG_TCM_USER2 is not set":
        assert "not in this kernel (CONFIG_TCM_USER2 is not set)" in _text(report, "target_core_user")
        assert "lazyfs tcmu attach cannot work" in _text(report, "target_core_user")

    # fs-verity: this host's kernel lacks CONFIG_FS_VERITY
    if _kernel_config_line("CONFIG_FS_VERITY") == "# CONFIG_FS_VERITY is not set":
        assert status["fs-verity"] == "missing" and "CONFIG_FS_VERITY is not set" in _text(report, "fs-verity")

    for option, topic, used in (("CONFIG_FUSE_PASSTHROUGH", "FUSE passthrough", "ok"),
                                ("CONFIG_FUSE_IO_URING", "FUSE over io_uring", "unused")):
        line = _kernel_config_line(option)
        if line is not None:
            assert status[topic] == (used if line.endswith("=y") or line.endswith("=m") else "missing"), topic
    if hostprobe.parse_release(os.uname().release) >= (6, 9):
        assert status["FUSE_NOTIFY_RESEND"] == "ok"

    disabled = open("/proc/sys/kernel/io_uring_disabled").read().strip() if os.path.exists(
        "/proc/sys/kernel/io_uring_disabled") else "0"
    if _kernel_config_line("CONFIG_IO_URING") == "CONFIG_IO_URING=y" and disabled == "0":
        assert status["io_uring"] == "unused"
    assert status["KVM"] == ("missing" if not os.path.exists("/dev/kvm") else status["KVM"])
    for tool, topic in (("podman", "podman"), ("qemu-system-x86_64", "qemu")):
        assert (status[topic] == "ok") == (shutil.which(tool) is not None), topic
    assert status["containerd"] == ("missing" if shutil.which("containerd") is None else status["containerd"])
    assert status["daemon"] == "ok" and "not running" in _text(report, "daemon")
    assert not os.path.exists(tmp_path / "cache")  # doctor creates nothing


def _mount_tmpfs(path, options: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "lazyfs-test", str(path)], check=True)


def test_cache_root_on_a_read_only_file_system_fails(tmp_path):
    require_root()
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "size=4m,ro")
    try:
        rc, report, human = _doctor(_config_file(tmp_path, cache_root=str(ro / "cache")))
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert rc == 1 and not report["mount_can_work"]
    assert _status(report)["cache root"] == "FAIL"
    assert "read-only file system" in _text(report, "cache root") and "does not start" in _text(report, "cache root")
    assert human.strip().splitlines()[-1] == "lazyfs mount cannot work here: cache root."


def test_state_dir_on_a_full_file_system_fails_but_a_full_cache_only_warns(tmp_path):
    require_root()
    full = tmp_path / "full"
    _mount_tmpfs(full, "size=1m")
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={full}/fill", "bs=64k"], capture_output=True)
        rc, report, _ = _doctor(_config_file(tmp_path, state_dir=str(full / "state"), cache_root=str(full / "cache")))
        assert rc == 1 and _status(report)["state dir"] == "FAIL" and "is full" in _text(report, "state dir")
        rc, report, _ = _doctor(_config_file(tmp_path, cache_root=str(full / "cache")))
        assert rc == 0 and _status(report)["cache root"] == "warn" and "fetched again" in _text(report, "cache root")
    finally:
        subprocess.run(["umount", str(full)], check=True)


# a shell script for `unshare --mount`: a private /dev holding copies of the host's device nodes,
# all but the ones named in $HIDE; the namespace (and so every mount made here) dies with the process
HIDE_DEVICES = r"""
set -e
old=$OLD_DEV
mkdir "$old"
mount --bind /dev "$old"
mount -t tmpfs -o mode=755 lazyfs-test-dev /dev
for f in "$old"/*; do
    name=$(basename "$f")
    case " $HIDE " in *" $name "*) continue ;; esac
    if [ -d "$f" ] && [ ! -L "$f" ]; then mkdir "/dev/$name"; else cp -a "$f" /dev/; fi
done
umount "$old"
rmdir "$old"
exec "$@"
"""


def _in_mount_namespace(hide: str, tmp_path) -> tuple[str, ...]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    return ("env", f"HIDE={hide}", f"OLD_DEV={tmp_path / 'host-dev'}", "unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE_DEVICES, "sh")


def test_missing_dev_fuse_in_a_mount_namespace_fails(tmp_path):
    require_root()
    require_fuse()
    rc, report, human = _doctor(_config_file(tmp_path), *_in_mount_namespace("fuse", tmp_path))
    status = _status(report)
    assert rc == 1, human
    assert status["FUSE"] == "FAIL" and "/dev/fuse: ENOENT" in _text(report, "FUSE")
    assert [c["topic"] for c in report["checks"] if c["status"] == "FAIL"] == ["FUSE"]
    assert status["loop devices"] == "ok"  # the other copied nodes still work: only FUSE is missing
    assert os.path.exists("/dev/fuse")  # the host's /dev is untouched


def test_missing_loop_control_in_a_mount_namespace_fails(tmp_path):
    require_root()
    require_loop()
    rc, report, _ = _doctor(_config_file(tmp_path), *_in_mount_namespace("loop-control", tmp_path))
    assert rc == 1
    assert _status(report)["loop devices"] == "FAIL" and "/dev/loop-control: ENOENT" in _text(report, "loop devices")
    assert _status(report)["FUSE"] == "ok"


def test_a_device_node_that_is_not_fuse_fails(tmp_path):
    require_root()
    script = "mount --bind /dev/null /dev/fuse && exec \"$@\""
    rc, report, _ = _doctor(_config_file(tmp_path), "unshare", "--mount", "--propagation", "private", "sh", "-c",
                            script, "sh")
    assert rc == 1 and "not the FUSE device" in _text(report, "FUSE") and "1:3" in _text(report, "FUSE")
