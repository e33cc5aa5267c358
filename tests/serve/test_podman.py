"""`podman run --rootfs TARGET:O` on a `lazyfs mount` (contrib/podman), end to end and offline.

Debian's podman with runc, its own storage and run directories under the test's tmp dir, no
network at all (``--network none``). The image is a small busybox tree built and pushed here,
with an /etc/os-release of its own so the output can only come from the lazyfs mount.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve import system
from lazyfs.serve.control import call
from tests.image.test_local import make_busybox_tree
from tests.serve.conftest import ROOT, leftovers

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop]

PODMAN_TIMEOUT = 120
# contrib/podman/containers.conf as documented, with podman's temporary state in the test's own
# short directory ([engine] is its last section)
CONTAINERS_CONF = os.path.join(ROOT, "contrib", "podman", "containers.conf")
# runroot holds conmon's sockets: a long path (pytest's tmp dirs) breaks them and every `podman
# run` then waits 20 s for conmon before it gives up, so state goes to a short directory.
STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{tmp}/storage"
runroot = "{run}/storage"
"""


@pytest.fixture(scope="module")
def image(env, tmp_path_factory):
    """A registry image whose /etc/os-release is unique to this test run."""
    tmp = tmp_path_factory.mktemp("podman-image")
    src = tmp / "src"
    make_busybox_tree(str(src))
    for applet in ("sleep", "ls", "grep"):
        if not (src / "bin" / applet).exists():
            os.symlink("busybox", src / "bin" / applet)
    os_release = f'PRETTY_NAME="lazyfs podman test"\nNAME="lazyfs"\nID=lazyfs-{uuid.uuid4().hex[:12]}\n'
    (src / "etc" / "os-release").unlink()  # a hard link in the tree: replace, not rewrite
    (src / "etc" / "os-release").write_text(os_release)
    local = LocalRef(str(tmp / "layout"), "v1")
    ref = f"{env.registry.registry}/serve/podman:v1"

    async def build_and_push():
        await create_image(local, from_dir=str(src))
        config = Config(registries=(RegistrySettings(env.registry.registry, plain_http=True),))
        async with ImageOpener(config) as opener:
            await push_image(opener, local, parse_reference(ref))

    trio.run(build_and_push)
    return ref, os_release, src


@pytest.fixture
def podman(tmp_path):
    """A function running `podman ARGS` with storage and state of its own under *tmp_path*."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/setup.sh installs it)")
    root = tmp_path / "podman"
    root.mkdir()
    run_dir = tempfile.mkdtemp(prefix="lazyfs-podman-")
    with open(CONTAINERS_CONF) as f:
        (root / "containers.conf").write_text(f.read() + f'tmp_dir = "{run_dir}/libpod"\n')
    (root / "storage.conf").write_text(STORAGE_CONF.format(tmp=root, run=run_dir))
    environ = {**os.environ, "CONTAINERS_CONF": str(root / "containers.conf"),
               "CONTAINERS_STORAGE_CONF": str(root / "storage.conf")}

    def run(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", *args], env=environ, capture_output=True, text=True,
                              timeout=PODMAN_TIMEOUT, stdin=subprocess.DEVNULL, **kw)

    run.popen = lambda *args: subprocess.Popen(["podman", *args], env=environ, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    yield run
    run("rm", "--all", "--force")
    stale = [m.mountpoint for m in system.mounts() if m.mountpoint.startswith((str(root), run_dir))]
    for mountpoint in reversed(stale):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    assert stale == [], f"podman left mounts behind: {stale}"


@pytest.fixture
def mounted(env, image, tmp_path):
    """The image mounted read-only with `lazyfs mount`; unmounted (and checked) after the test."""
    ref, _, _ = image
    target = tmp_path / "rootfs"
    target.mkdir()
    env.lazyfs("mount", ref, str(target))
    yield target
    if system.is_mountpoint(target) or any(a.get("target") == str(target) for a in _attachments(env)):
        env.lazyfs("umount", str(target))
    assert leftovers(env) == [] and not [a for a in _attachments(env) if a.get("target") == str(target)]


def _attachments(env) -> list[dict]:
    return [{**a, **(a.get("extra") or {})} for a in call(env.socket, "list", timeout=10)]


def _run(podman, target, *command: str) -> subprocess.CompletedProcess:
    return podman("run", "--rm", "--network", "none", "--rootfs", f"{target}:O", *command)


def test_podman_prints_the_images_os_release_offline(podman, mounted, image):
    _, os_release, _ = image
    done = _run(podman, mounted, "/bin/cat", "/etc/os-release")
    assert done.returncode == 0, done.stderr
    assert done.stdout == os_release
    # no network: the container sees only its loopback interface
    net = _run(podman, mounted, "/bin/cat", "/proc/net/dev")
    assert net.returncode == 0, net.stderr
    interfaces = [line.split(":")[0].strip() for line in net.stdout.splitlines()[2:]]
    assert interfaces == ["lo"], net.stdout


def test_containers_write_to_their_own_overlay_never_to_the_image(podman, mounted):
    """Two containers on one read-only lazyfs mount at once: each writes, sees only its own write."""
    script = "echo $0 > /etc/written && sleep 1 && cat /etc/written && ls /etc"
    procs = {name: podman.popen("run", "--rm", "--network", "none", "--rootfs", f"{mounted}:O",
                                "/bin/sh", "-c", script, name) for name in ("first", "second")}
    outputs = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=PODMAN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        outputs[name] = out.splitlines()
    for name, lines in outputs.items():
        assert lines[0] == name and "written" in lines[1:], lines
    assert not (mounted / "etc" / "written").exists()
    again = _run(podman, mounted, "/bin/cat", "/etc/written")
    assert again.returncode != 0 and "No such file" in again.stderr + again.stdout


def test_umount_during_a_container_keeps_it_working_until_it_exits(env, podman, mounted, image):
    """Overlay holds the image's file system: `lazyfs umount` frees the directory, but the image
    stays attached (and readable in the container) until the container is gone; then it detaches."""
    _, _, src = image
    proc = podman.popen("run", "--rm", "--network", "none", "--name", "lazyfs-busy", "--rootfs", f"{mounted}:O",
                        "/bin/sh", "-c", "echo ready && sleep 60")
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.poll() is not None else ""
        first = env.lazyfs("umount", str(mounted), check=False)
        assert first.returncode == 1 and "still open" in first.stderr, first.stderr
        assert not system.is_mountpoint(mounted)
        # the container reads on, through the image that is still attached
        md5 = podman("exec", "lazyfs-busy", "/bin/busybox", "md5sum", "/data/owned")
        assert md5.returncode == 0, md5.stderr
        expected = subprocess.run(["md5sum", str(src / "data" / "owned")], capture_output=True, text=True).stdout
        assert md5.stdout.split()[0] == expected.split()[0]
    finally:
        podman("kill", "--all")
        proc.communicate(timeout=PODMAN_TIMEOUT)
    second = env.lazyfs("umount", str(mounted), check=False)
    assert second.returncode == 0 and "detached image" in second.stdout, second.stderr
