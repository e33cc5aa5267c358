"""`lazyfs convert` end to end. Oracle: `umoci unpack` of the same source image.

Images are built the way users build them (umoci + GNU tar, skopeo into a real
docker-registry), converted, mounted with `lazyfs mount` (FUSE + loop + ext4)
and compared with umoci's unpack: paths, types, modes, owners, sizes, content
digests, symlink targets, hardlink groups, xattrs and file mtimes.
"""

import json
import os
import struct
import subprocess
import tarfile
from io import BytesIO

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.format.reference import parse_reference
from lazyfs.image.remote import ImageOpener
from lazyfs.serve import system
from tests.support.cli import run_lazyfs
from tests.support.cleanup import loops_under, release_under
from tests.support.notation import TestSigner
from tests.support.ociimages import (
    debian_minbase_tar,
    skopeo_copy,
    tar_tree,
    umoci_add_layer,
    umoci_config,
    umoci_new,
    umoci_unpack,
    write_image,
    write_index,
)
from tests.support.registry import registry_fixture
from tests.support.trees import describe_tree, tree_differences

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
registry = registry_fixture()
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # cap_net_bind_service+ep


class Env:
    """Own config, run, cache dirs; a daemon for mounts that is stopped at the end."""

    def __init__(self, tmp, registry):
        self.tmp = tmp
        self.registry = registry
        self.mounts = 0
        self.config_path = self.config("main")
        self.socket = os.path.join(str(tmp / "run"), "lazyfs.sock")

    def config(self, cache: str, **extra) -> str:
        """A config file whose conversion cache is ``cache-<cache>`` (a fresh name is a cold cache)."""
        path = str(self.tmp / f"config-{cache}.json")
        doc = {"run_dir": str(self.tmp / "run"), "state_dir": str(self.tmp / "state"),
               "cache_root": str(self.tmp / f"cache-{cache}"), "writable_root": str(self.tmp / "writable"),
               "trace_record_seconds": 0, "registries": [{"host": self.registry.registry, "plain_http": True}],
               **extra}
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def lazyfs(self, *args, config=None, check=True, timeout=600):
        return run_lazyfs(config or self.config_path, *args, check=check, timeout=timeout)

    def convert(self, src, dst, *args, config=None) -> dict:
        return json.loads(self.lazyfs("convert", src, dst, "--json", *args, config=config).stdout)

    def mounted_tree(self, image, *args, check=None, config=None) -> dict:
        """Mount *image*, describe its tree (and run *check(target, info)*), unmount."""
        self.mounts += 1
        target = self.tmp / f"mnt{self.mounts}"
        target.mkdir()
        info = json.loads(self.lazyfs("mount", image, str(target), "--json", *args, config=config).stdout)
        try:
            tree = describe_tree(str(target))
            if check is not None:
                check(str(target), info)
            return tree
        finally:
            self.lazyfs("umount", str(target))

    def ref(self, name: str) -> str:
        return f"{self.registry.registry}/{name}"

    def cleanup(self):
        release_under(self.tmp, self.socket)


def module_env(registry, tmp_path_factory, name: str, why_root: str):
    """The body of a module-scoped ``env`` fixture (``yield from`` it): an Env in a fresh
    temporary directory *name*, released afterwards; skipped with *why_root* unless root."""
    if os.geteuid() != 0:
        pytest.skip(why_root)
    e = Env(tmp_path_factory.mktemp(name), registry)
    yield e
    e.cleanup()


def leftovers(tmp) -> list[str]:
    """Mounts and loop devices under *tmp* (conversion must leave none, even when it fails)."""
    found = [m.mountpoint for m in system.mounts() if m.mountpoint.startswith(str(tmp))]
    return found + [line for line in loops_under(tmp) if "/export/" not in line]


# ---------------------------------------------------------------- the edge-case image


def write(path, data=b"", mtime=1_600_000_000, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def layer1(root):
    """Files, hardlinks, symlinks, devices, modes, owners, xattrs, capabilities, sparse and long names."""
    j = os.path.join
    write(j(root, "etc/config"), b"version 1\n")
    write(j(root, "data/keep"), b"keep me\n")
    os.link(j(root, "data/keep"), j(root, "etc/keep-link"))  # a hardlink across directories
    write(j(root, "data/remove_me"), b"gone in layer 2\n")
    write(j(root, "data/sub/deep/file"), b"deep\n")
    write(j(root, "data/xattr"), b"x")
    os.setxattr(j(root, "data/xattr"), "user.lazyfs", b"user value")
    os.setxattr(j(root, "data/xattr"), "trusted.lazyfs", b"\x00\x01binary\xff")
    write(j(root, "data/owned"), os.urandom(70_000), mode=0o640)
    os.chown(j(root, "data/owned"), 1234, 5678)
    with open(j(root, "data/sparse.img"), "wb") as f:
        f.truncate(9 << 20)
        f.seek(5 << 20)
        f.write(b"in the middle")
    write(j(root, "data/ünïcödé"), b"unicode\n")
    write(j(root, "data/bad\udcffname"), b"not utf-8\n")
    write(j(root, "data", "n" * 200), b"long name\n")
    deep = j(root, "deep", *[f"segment-{i:02d}" for i in range(14)], "file-at-the-bottom")
    write(deep, b"long path\n")
    write(j(root, "hard/a"), b"hard\n")
    os.link(j(root, "hard/a"), j(root, "hard/b"))
    os.makedirs(j(root, "links"))
    os.symlink("../etc/config", j(root, "links/rel"))
    os.symlink("/etc/config", j(root, "links/abs"))
    os.symlink("../nowhere", j(root, "links/dangling"))
    os.symlink("../data", j(root, "links/dir"))
    os.symlink("t" * 150, j(root, "links/long-target"))
    os.makedirs(j(root, "dev"))
    os.mknod(j(root, "dev/null"), 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(j(root, "dev/sda"), 0o660 | 0o060000, os.makedev(8, 0))
    os.mkfifo(j(root, "dev/fifo"), 0o644)
    write(j(root, "bin/suid"), b"#!/bin/sh\n", mode=0o4755)
    write(j(root, "bin/sgid"), b"#!/bin/sh\n", mode=0o2711)
    write(j(root, "bin/cap"), b"\x7fELF-ish\n", mode=0o755)
    os.setxattr(j(root, "bin/cap"), "security.capability", CAPABILITY)
    os.makedirs(j(root, "tmp"))
    os.chmod(j(root, "tmp"), 0o1777)
    for name in ("opq/a", "opq/b", "opq/sub/c", "dir_to_file/x", "dir_to_file/y/z"):
        write(j(root, name), name.encode())
    write(j(root, "file_to_dir"), b"a file first\n")
    os.symlink("data", j(root, "sym_to_dir"))


def layer2(root):
    """Changes, whiteouts, an opaque directory, types replaced both ways."""
    j = os.path.join
    write(j(root, "etc/config"), b"version 2, changed\n", mtime=1_700_000_000)
    write(j(root, "data/.wh.remove_me"))
    write(j(root, "data/.wh.sub"))  # a whole tree
    write(j(root, "opq/.wh..wh..opq"))
    write(j(root, "opq/new"), b"only child now\n")
    write(j(root, "dir_to_file"), b"was a directory\n")
    write(j(root, "file_to_dir/inner"), b"was a file\n")
    write(j(root, "sym_to_dir/f"), b"was a symlink\n")
    write(j(root, "bin/newcap"), b"cap 2\n", mode=0o750)
    os.setxattr(j(root, "bin/newcap"), "security.capability", CAPABILITY)
    write(j(root, "bin/suid"), b"#!/bin/sh\n# changed mode\n", mode=0o6755)


def tar_layer(path, members, format=tarfile.PAX_FORMAT):
    """A layer written entry by entry: (name, type, extra) -- for what a tree cannot express."""
    with tarfile.open(path, "w", format=format) as tf:
        for name, kind, extra in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_650_000_000
            ti.type = kind
            data = None
            if kind == tarfile.REGTYPE:
                data = extra.encode()
                ti.size = len(data)
                ti.mode = 0o644
            elif kind in (tarfile.LNKTYPE, tarfile.SYMTYPE):
                ti.linkname = extra
            elif kind == tarfile.DIRTYPE:
                ti.mode = 0o755
            tf.addfile(ti, BytesIO(data) if data is not None else None)
    return path


def layer3(path, variant="v1"):
    """Writes through a symlinked parent, hardlinks to lower files and through symlinks, same-layer whiteouts;
    in GNU format, with GNU long names and long link targets."""
    long_dir = "gnu/" + "d" * 120
    return tar_layer(path, [
        (f"{long_dir}/{'f' * 130}", tarfile.REGTYPE, "GNU long name"),
        ("gnu/long-symlink", tarfile.SYMTYPE, "../" + "t" * 140),
        (f"gnu/{'h' * 110}", tarfile.LNKTYPE, f"{long_dir}/{'f' * 130}"),
        ("links/dir/through.txt", tarfile.REGTYPE, "written through links/dir -> ../data"),
        ("hard/c", tarfile.LNKTYPE, "hard/a"),  # to a file of layer 1
        ("data/keep", tarfile.REGTYPE, "replaced in layer 3"),
        ("data/.wh.keep", tarfile.REGTYPE, ""),  # must not remove the same layer's file
        ("hard/d", tarfile.LNKTYPE, "links/dir/keep"),  # resolves to data/keep (this layer's)
        ("etc/.wh.keep-link", tarfile.REGTYPE, ""),
        ("newdir/.wh..wh..opq", tarfile.REGTYPE, ""),
        ("newdir/x", tarfile.REGTYPE, "x"),
        ("top", tarfile.REGTYPE, f"top layer {variant}"),
    ], format=tarfile.GNU_FORMAT)


def bottom_tars(tmp) -> list[str]:
    """Layers 1 and 2 of the edge-case image, as tars under *tmp*."""
    tars = []
    for name, make in (("l1", layer1), ("l2", layer2)):
        tree = tmp / f"tree-{name}"
        tree.mkdir()
        make(str(tree))
        tars.append(tar_tree(str(tree), str(tmp / f"{name}.tar")))
    return tars


@pytest.fixture(scope="module")
def env(registry, tmp_path_factory):
    yield from module_env(registry, tmp_path_factory, "convert",
                          "conversion applies layers with a loop-mounted ext4: needs root")


@pytest.fixture(scope="module")
def edge(env):
    """An umoci layout with tags v1 and v2/v3 (same two bottom layers, different top), and umoci's unpacks."""
    tmp = env.tmp
    tars = bottom_tars(tmp)
    layout = str(tmp / "umoci")
    umoci_new(layout, "base")
    for t in tars:
        umoci_add_layer(layout, "base", t)
    tops = {v: layer3(str(tmp / f"l3-{v}.tar"), v) for v in ("v1", "v2", "v3")}
    for v, t in tops.items():
        umoci_add_layer(layout, "base", t, new_tag=v)
    umoci_config(layout, "v1", "--config.entrypoint", "/bin/sh", "--config.env", "EDGE=1",
                 "--config.user", "1234:5678", "--config.workingdir", "/data")
    oracle = {v: describe_tree(umoci_unpack(layout, v, str(tmp / f"bundle-{v}"))) for v in tops}
    return {"layout": layout, "tars": tars + [tops["v1"]], "oracle": oracle}


def assert_same(expected, got):
    diffs = tree_differences(expected, got)
    assert diffs == [], f"{len(diffs)} differences:\n" + "\n".join(diffs[:30])


def check_fsck(target, info):
    fsck = subprocess.run(["e2fsck", "-fn", info["path"]], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# ---------------------------------------------------------------- tests


def test_edge_cases_match_umoci_unpack(env, edge):
    out = f"oci:{env.tmp}/out:v1"
    summary = env.convert(f"oci:{edge['layout']}:v1", out)
    assert summary["layers_converted"] == 3 and len(summary["layers"]) == 3
    sizes = [layer["virtual_size"] for layer in summary["layers"]]
    assert sizes == sorted(sizes) and summary["virtual_size"] == sizes[-1]
    tree = env.mounted_tree(out, check=check_fsck)
    assert_same(edge["oracle"]["v1"], tree)
    # spot checks that the comparison really covers what the layers did
    assert tree["data/through.txt"][0] != 0 and "data/remove_me" not in tree and "data/sub" not in tree
    assert sorted(p for p in tree if p.startswith("opq/")) == ["opq/new"]
    assert tree["hard/c"][7] == tree["hard/a"][7] and tree["hard/d"][7] == tree["data/keep"][7]
    assert tree["bin/cap"][6] == {"security.capability": CAPABILITY}
    assert tree["bin/suid"][1] == 0o6755 and tree["tmp"][1] == 0o1777
    assert tree["gnu/" + "h" * 110][7] == tree["gnu/" + "d" * 120 + "/" + "f" * 130][7]

    target = env.tmp / "mnt-writable"  # the journal is back: a writable mount works
    target.mkdir()
    env.lazyfs("mount", out, str(target), "--writable")
    try:
        (target / "data" / "written").write_text("on a converted image\n")
        os.sync()
    finally:
        env.lazyfs("umount", str(target))

    layout = json.loads(open(f"{env.tmp}/out/index.json").read())
    manifest_digest = summary["manifest"]
    blob = lambda digest: json.loads(open(f"{env.tmp}/out/blobs/sha256/{digest.split(':')[1]}").read())  # noqa: E731
    manifest = blob(manifest_digest)
    assert manifest["subject"]["digest"] == summary["source_manifest"]
    assert [layer["annotations"]["dev.lazyfs.convert.chain-id"] for layer in manifest["layers"]] == \
        [layer["chain_id"] for layer in summary["layers"]]
    config = blob(manifest["config"]["digest"])
    assert config["config"]["Entrypoint"] == ["/bin/sh"] and "EDGE=1" in config["config"]["Env"]
    assert config["config"]["User"] == "1234:5678" and config["config"]["WorkingDir"] == "/data"
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
    fallback = "sha256-" + summary["source_manifest"].split(":")[1]
    assert fallback in {m["annotations"]["org.opencontainers.image.ref.name"] for m in layout["manifests"]}
    assert leftovers(env.tmp / "cache-main") == []


def test_reconversion_gives_the_same_digests(env, edge):
    first = env.convert(f"oci:{edge['layout']}:v1", f"oci:{env.tmp}/det-a:v1", "--no-cache")
    again = env.convert(f"oci:{edge['layout']}:v1", f"oci:{env.tmp}/det-b:v1", "--no-cache")
    assert first["layers_converted"] == again["layers_converted"] == 3
    assert [layer["digest"] for layer in first["layers"]] == [layer["digest"] for layer in again["layers"]]
    assert first["manifest"] == again["manifest"]


def test_compressions_docker_manifests_and_platforms(env, edge):
    """zstd, plain and gzip layers; a multi-arch index; Docker v2 manifests from a registry."""
    layout = str(env.tmp / "multi")
    amd = write_image(layout, "amd64-only", edge["tars"], compression=["zstd", "none", "gzip"],
                      config={"config": {"Entrypoint": ["/bin/sh"]}})
    arm_tar = tar_layer(str(env.tmp / "arm.tar"), [("arch", tarfile.REGTYPE, "arm64")])
    arm = write_image(layout, None, [arm_tar], architecture="arm64", variant="v8")
    write_index(layout, "multi", [(*amd, "linux/amd64"), (*arm, "linux/arm64/v8")])

    summary = env.convert(f"oci:{layout}:multi", f"oci:{env.tmp}/multi-out:amd64", "--platform", "linux/amd64",
                          "--no-cache")
    assert summary["source_manifest"] == amd[0] and summary["layers_converted"] == 3
    assert_same(edge["oracle"]["v1"], env.mounted_tree(f"oci:{env.tmp}/multi-out:amd64"))

    summary = env.convert(f"oci:{layout}:multi", f"oci:{env.tmp}/multi-out:arm64", "--platform", "linux/arm64")
    assert summary["source_manifest"] == arm[0] and summary["platform"] == "linux/arm64"
    assert "arch" in env.mounted_tree(f"oci:{env.tmp}/multi-out:arm64")
    missing = env.lazyfs("convert", f"oci:{layout}:multi", f"oci:{env.tmp}/x:y", "--platform", "linux/s390x",
                         check=False)
    assert missing.returncode == 1 and "linux/s390x" in missing.stderr and "linux/amd64" in missing.stderr

    skopeo_copy(f"oci:{edge['layout']}:v1", f"docker://{env.ref('docker/edge:1')}", "--format", "v2s2")
    summary = env.convert(env.ref("docker/edge:1"), env.ref("docker/edge:1-lazyfs"), "--no-cache")
    assert summary["layers_converted"] == 3 and summary["bytes_downloaded"] > 0
    assert_same(edge["oracle"]["v1"], env.mounted_tree(env.ref("docker/edge:1-lazyfs")))


def test_cache_and_referrers(env, edge):
    """v1 then v2 (one changed top layer): one layer converted and pushed; twins found in the registry."""
    for v in ("v1", "v2", "v3"):
        skopeo_copy(f"oci:{edge['layout']}:{v}", f"docker://{env.ref('app:' + v)}")
    cache_a = env.config("a")
    first = env.convert(env.ref("app:v1"), env.ref("app:v1-lazyfs"), config=cache_a)
    assert (first["layers_converted"], first["layers_pushed"]) == (3, 3)
    second = env.convert(env.ref("app:v2"), env.ref("app:v2-lazyfs"), config=cache_a)
    assert (second["layers_converted"], second["layers_reused"], second["layers_pushed"]) == (1, 2, 1)
    assert [layer["origin"] for layer in second["layers"]] == ["cache", "cache", "converted"]
    assert [layer["digest"] for layer in second["layers"][:2]] == [layer["digest"] for layer in first["layers"][:2]]

    # a cold cache (another host) reuses nothing it cannot trust: it converts app:v2 again, to the same digests
    untrusting = env.convert(env.ref("app:v2"), env.ref("app:v2-again"), config=env.config("b0"))
    assert untrusting["layers_converted"] == 3 and untrusting["manifest"] == second["manifest"]
    assert second["manifest"] in {d["artifact"] for d in untrusting["untrusted_images"]}

    # once the twins are signed, a cold cache that trusts the signer finds the twin of app:v2 through its
    # referrers tag: nothing converted or pushed
    signer = TestSigner(str(env.tmp / "signer"))
    repo = parse_reference(env.ref("app"))

    async def sign_twins():
        async with ImageOpener(Config(registries=(RegistrySettings(env.registry.registry, plain_http=True),))) as o:
            for twin in (first["manifest"], second["manifest"]):
                await signer.sign_remote(o.client, repo, twin)

    trio.run(sign_twins)
    trusting = {"trust": {"trust_store": [signer.root]}}
    again = env.convert(env.ref("app:v2"), env.ref("app:v2-again"), config=env.config("b", **trusting))
    assert (again["layers_converted"], again["layers_pushed"]) == (0, 0)
    assert {layer["origin"] for layer in again["layers"]} == {"target"} and again["manifest"] == second["manifest"]

    # a cold cache converting v3 reuses v1's bottom layers from the registry (materialized there)
    third = env.convert(env.ref("app:v3"), env.ref("app:v3-lazyfs"), config=env.config("c", **trusting))
    assert [layer["origin"] for layer in third["layers"]] == ["target", "target", "converted"]
    fresh = env.convert(env.ref("app:v3"), f"oci:{env.tmp}/v3-fresh:v3", "--no-cache", config=env.config("d"))
    assert fresh["layers"][2]["digest"] == third["layers"][2]["digest"]  # same blocks as converting from scratch

    # mount the ordinary reference: --prefer-lazyfs finds its twin through the referrers tag (converted by "c")
    assert_same(edge["oracle"]["v3"], env.mounted_tree(env.ref("app:v3"), "--prefer-lazyfs", config=env.config("c")))
    plain = env.lazyfs("mount", env.ref("app:v3"), str(env.tmp), check=False)
    assert plain.returncode == 1 and "convert it first" in plain.stderr
    assert leftovers(env.tmp / "cache-c") == []


def test_filesystem_grows_for_later_layers(env, tmp_path):
    """A later layer with more files than the first filesystem has inodes: it is grown (resize2fs)."""
    base = tar_layer(str(tmp_path / "base.tar"), [("etc/hostname", tarfile.REGTYPE, "small\n")])
    many = tar_layer(str(tmp_path / "many.tar"),
                     [(f"many/{i // 1000:02d}/{i:05d}", tarfile.REGTYPE, str(i)) for i in range(20_000)])
    layout = str(tmp_path / "layout")
    umoci_new(layout, "grow")
    umoci_add_layer(layout, "grow", base)
    umoci_add_layer(layout, "grow", many)
    oracle = describe_tree(umoci_unpack(layout, "grow", str(tmp_path / "bundle")))
    summary = env.convert(f"oci:{layout}:grow", f"oci:{tmp_path}/out:grow")
    first, second = (layer["virtual_size"] for layer in summary["layers"])
    assert second > first and summary["virtual_size"] == second
    assert_same(oracle, env.mounted_tree(f"oci:{tmp_path}/out:grow", check=check_fsck))
    again = env.convert(f"oci:{layout}:grow", f"oci:{tmp_path}/again:grow", "--no-cache")
    assert again["manifest"] == summary["manifest"]  # resize2fs is reproducible too


# ---------------------------------------------------------------- malicious layers


MALICIOUS = {
    "dotdot": [("../../outside/pwned", tarfile.REGTYPE, "x")],
    "dotdot-inner": [("a/../../outside/pwned", tarfile.REGTYPE, "x")],
    "absolute": [("/outside/pwned", tarfile.REGTYPE, "x")],
    "symlink-write-through": [("evil", tarfile.SYMTYPE, "../../../../../../../../../../OUTSIDE"),
                              ("evil/pwned", tarfile.REGTYPE, "x")],
    "symlink-chain": [("a", tarfile.SYMTYPE, "b/../.."), ("b", tarfile.DIRTYPE, ""),
                      ("a/c/pwned", tarfile.REGTYPE, "x")],
    "hardlink-outside": [("pwned", tarfile.LNKTYPE, "../../../../../../etc/passwd")],
    "hardlink-absolute": [("pwned", tarfile.LNKTYPE, "/etc/passwd")],
    "hardlink-through-symlink": [("esc", tarfile.SYMTYPE, "../../../../../../../.."),
                                 ("pwned", tarfile.LNKTYPE, "esc/etc/passwd")],
    "whiteout-through-symlink": [("esc", tarfile.SYMTYPE, "../../../../../../../.."),
                                 ("esc/tmp/.wh.victim", tarfile.REGTYPE, "")],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_layers_are_rejected(env, case, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("still here\n")
    members = [(n.replace("OUTSIDE", str(outside).lstrip("/")), t, x) for n, t, x in MALICIOUS[case]]
    base = tar_layer(str(tmp_path / "base.tar"), [("etc/hostname", tarfile.REGTYPE, "base\n")])
    evil = tar_layer(str(tmp_path / "evil.tar"), members)
    layout = str(tmp_path / "layout")
    write_image(layout, "evil", [base, evil])
    passwd = os.stat("/etc/passwd")
    proc = env.lazyfs("convert", f"oci:{layout}:evil", f"oci:{tmp_path}/out:evil", "--json", check=False)
    assert proc.returncode == 1, proc.stdout
    bad = members[-1][0]
    assert repr(bad) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(outside) == ["victim"] and (outside / "victim").read_text() == "still here\n"
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink and os.stat("/etc/passwd").st_mtime == passwd.st_mtime
    assert not os.path.exists(f"{tmp_path}/out/index.json")
    assert leftovers(env.tmp / "cache-main") == []


def test_absolute_symlinks_resolve_inside_the_image(env, tmp_path):
    """`evil -> /etc` then `evil/x`: like a chrooted process, the write lands in the image's /etc."""
    evil = tar_layer(str(tmp_path / "l.tar"), [("etc", tarfile.DIRTYPE, ""), ("evil", tarfile.SYMTYPE, "/etc"),
                                               ("evil/x", tarfile.REGTYPE, "inside\n")])
    layout = str(tmp_path / "layout")
    write_image(layout, "abs", [evil])
    env.convert(f"oci:{layout}:abs", f"oci:{layout}:abs-lazyfs")  # the twin in the source's own layout
    assert not os.path.exists("/etc/x")
    tree = env.mounted_tree(f"oci:{layout}:abs", "--prefer-lazyfs")
    assert tree["etc/x"][4] == len("inside\n") and tree["evil"][5] == "/etc"


# ---------------------------------------------------------------- a real Debian root


@pytest.mark.slow
def test_debian_minbase(env):
    tar = debian_minbase_tar()
    layout = str(env.tmp / "debian")
    umoci_new(layout, "12")
    umoci_add_layer(layout, "12", tar)
    oracle = describe_tree(umoci_unpack(layout, "12", str(env.tmp / "bundle-debian")))
    summary = env.convert(f"oci:{layout}:12", f"oci:{env.tmp}/debian-out:12")
    assert summary["layers_converted"] == 1

    def run_in_chroot(target, info):
        check_fsck(target, info)
        cat = subprocess.run(["chroot", target, "/bin/sh", "-c", "cat /etc/os-release"], capture_output=True,
                             text=True, timeout=60)
        assert cat.returncode == 0 and 'ID=debian' in cat.stdout, cat.stderr

    assert_same(oracle, env.mounted_tree(f"oci:{env.tmp}/debian-out:12", check=run_in_chroot))
