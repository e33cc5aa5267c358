"""The real thing: an ext4 image of a busybox tree, through create/info/verify/flatten/commit."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.trees import describe_tree, tree_differences

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lazyfs(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode:
        raise AssertionError(f"lazyfs {' '.join(args)} failed: {proc.stderr}")
    return proc


def make_busybox_tree(root):
    """A small root filesystem: busybox + applet links, holes, hardlinks, symlinks, xattrs, owners, devices."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    for d in ["bin", "etc", "var/lib", "tmp", "dev", "data/deep/er"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy2(busybox, os.path.join(root, "bin/busybox"))
    for applet in ["sh", "ls", "cat", "echo"]:
        os.symlink("busybox", os.path.join(root, "bin", applet))
    with open(os.path.join(root, "etc/os-release"), "w") as f:
        f.write('NAME="lazyfs test"\n')
    with open(os.path.join(root, "data/sparse.img"), "wb") as f:  # holes around data
        f.seek(5 << 20)
        f.write(b"middle")
        f.seek(9 << 20)
        f.write(b"end")
    os.link(os.path.join(root, "etc/os-release"), os.path.join(root, "data/deep/er/hardlink"))
    os.symlink("/etc/os-release", os.path.join(root, "data/abs-link"))
    os.symlink("../nowhere", os.path.join(root, "data/dangling"))
    with open(os.path.join(root, "data/owned"), "wb") as f:
        f.write(os.urandom(300_000))
    os.chown(os.path.join(root, "data/owned"), 1234, 5678)
    os.chmod(os.path.join(root, "data/owned"), 0o4751)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.setxattr(os.path.join(root, "data/owned"), "user.lazyfs", b"xattr value")
    os.mknod(os.path.join(root, "dev/null"), 0o666 | 0o020000, os.makedev(1, 3))
    os.mkfifo(os.path.join(root, "dev/fifo"))
    os.utime(os.path.join(root, "etc/os-release"), (1_600_000_000, 1_600_000_000))


@pytest.mark.loop
def test_create_from_dir_round_trip(tmp_path):
    src = tmp_path / "src"
    make_busybox_tree(str(src))
    image = f"oci:{tmp_path}/layout:v1"
    created = json.loads(lazyfs("create", image, "--from-dir", str(src), "--json").stdout)
    assert created["chunks_stored"] > 0

    info = json.loads(lazyfs("info", image, "--json").stdout)
    assert info["virtual_size"] == created["virtual_size"] and len(info["layers"]) == 1
    assert info["layers"][0]["hole_bytes"] > 0  # the empty part of the filesystem is not stored
    assert "every blob and chunk digest matches" in lazyfs("verify", image).stdout

    raw = str(tmp_path / "flat.img")
    lazyfs("flatten", image, raw)
    fsck = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # skopeo reads the layout as a normal OCI image
    if shutil.which("skopeo"):
        out = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{tmp_path}/layout:v1"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["layers"][0]["mediaType"] == "application/vnd.lazyfs.layer.v2"

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dev = subprocess.run(["losetup", "-r", "-f", "--show", raw], capture_output=True, text=True, check=True).stdout.strip()
    try:
        subprocess.run(["mount", "-t", "ext4", "-o", "ro", dev, str(mnt)], check=True)
        try:
            diffs = tree_differences(describe_tree(str(src)), describe_tree(str(mnt)))
            assert diffs == [], "\n".join(diffs[:20])
            run = subprocess.run(["chroot", str(mnt), "/bin/sh", "-c", "cat /etc/os-release"], capture_output=True, text=True)
            assert run.stdout == 'NAME="lazyfs test"\n'
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_commit_stacks_a_layer_and_dedups(tmp_path):
    data = bytearray(os.urandom(2 << 20))
    raw1 = tmp_path / "a.img"
    raw1.write_bytes(bytes(data) + bytes(2 << 20))
    image1 = f"oci:{tmp_path}/layout:one"
    lazyfs("create", image1, "--from-file", str(raw1))
    # the same disk with one 4 KiB block changed and one zeroed
    data[8192:12288] = b"\x01" * 4096
    data[1 << 20 : (1 << 20) + 4096] = bytes(4096)
    raw2 = tmp_path / "b.img"
    raw2.write_bytes(bytes(data) + bytes(2 << 20))
    image2 = f"oci:{tmp_path}/layout:two"
    created = json.loads(lazyfs("create", image2, "--from-file", str(raw2), "--base", image1, "--json").stdout)
    assert created["raw_bytes"] == 4096  # only the changed block was stored
    info = json.loads(lazyfs("info", image2, "--json").stdout)
    assert len(info["layers"]) == 2
    lazyfs("flatten", image2, str(tmp_path / "flat2.img"))
    assert (tmp_path / "flat2.img").read_bytes() == raw2.read_bytes()

    # a writable layer made with the CLI and committed
    wdir = str(tmp_path / "writable")
    lazyfs("writable", image1, wdir)
    from lazyfs.device.writable import open_writable

    layer = open_writable(wdir)
    layer.write_blocks(64, raw1.read_bytes()[: 256 << 10])  # the first chunk again: deduplicated
    layer.write_blocks(600, b"\x02" * 4096)
    layer.zero_blocks(2, 1)
    layer.flush()
    layer.close()
    committed = json.loads(lazyfs("commit", image1, wdir, f"oci:{tmp_path}/out:c", "--json").stdout)
    assert committed["chunks_deduplicated"] == 1 and committed["chunks_stored"] == 1
    lazyfs("flatten", f"oci:{tmp_path}/out:c", str(tmp_path / "flat3.img"))
    want = bytearray(raw1.read_bytes())
    want[256 << 10 : 512 << 10] = want[: 256 << 10]
    want[600 * 4096 : 601 * 4096] = b"\x02" * 4096
    want[8192:12288] = bytes(4096)
    assert (tmp_path / "flat3.img").read_bytes() == want
    assert lazyfs("verify", f"oci:{tmp_path}/out:c").returncode == 0


def test_verify_names_a_corrupted_chunk(tmp_path):
    raw = tmp_path / "a.img"
    raw.write_bytes(os.urandom(1 << 20))
    image = f"oci:{tmp_path}/layout:x"
    lazyfs("create", image, "--from-file", str(raw), "--chunk-size", "64K")
    info = json.loads(lazyfs("info", image, "--json").stdout)
    blob = tmp_path / "layout/blobs/sha256" / info["layers"][0]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[70_000] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    proc = lazyfs("verify", image, check=False)
    assert proc.returncode == 1
    assert "chunk" in proc.stdout and "digest mismatch" in proc.stdout
    proc = lazyfs("flatten", image, str(tmp_path / "x.img"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "digest mismatch" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["info", "oci:/nonexistent/layout"], "not an OCI image layout"),
    (["create", "oci:/tmp/lazyfs-never/x", "--from-dir", "/nonexistent"], "is not a directory"),
    (["create", "oci:/tmp/lazyfs-never/x"], "give --size"),
    (["commit", "oci:/nonexistent/a", "/nonexistent/w", "oci:/tmp/lazyfs-never/y"], "not an OCI image layout"),
    (["info", "registry.invalid/foo:1"], "not a local image"),
])
def test_user_errors_are_one_clear_line(args, message):
    proc = lazyfs(*args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
