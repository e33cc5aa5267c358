"""Ordinary OCI images for conversion tests: layers from directory trees, umoci, a Debian root.

* ``tar_tree``: a directory as a layer tar with GNU tar (PAX format, xattrs,
  sparse files, numeric owners) -- whiteout files in the tree are archived as
  they are, so a test writes ``.wh.NAME`` files to delete;
* ``umoci_*``: build images the way users do (``umoci new`` + ``raw
  add-layer``) and unpack them (the oracle the converted trees are compared to);
* ``write_image``: an image written directly (any compression per layer,
  Docker or OCI media types) and ``write_index`` for multi-arch indexes;
* ``debian_minbase_tar``: a debootstrap ``--variant=minbase`` root as a tar,
  cached (it takes a minute and needs deb.debian.org); ``debian_three_layers``: that root
  cut into three layer tars, the way images are usually stacked.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

import zstandard

from lazyfs.format.oci import MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, canonical_json
from lazyfs.format.ociimage import DOCKER_CONFIG, DOCKER_MANIFEST
from lazyfs.image.layout import OciLayout

DEFAULT_CACHE = "/var/cache/lazyfs-test"
LAYER_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("oci", "zstd-frames"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


def run(cmd: list[str], timeout: float = 600, **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def tar_tree(directory: str, out: str) -> str:
    """*directory* as an uncompressed layer tar at *out* (entries sorted, atime/ctime left out)."""
    run(["tar", "--create", "--file", out, "--directory", directory, "--format=posix",
         "--pax-option=delete=atime,delete=ctime", "--xattrs", "--xattrs-include=*", "--acls", "--sparse",
         "--numeric-owner", "--sort=name", "."])
    return out


# ---------------------------------------------------------------- umoci


def umoci_new(layout: str, tag: str) -> None:
    if not os.path.exists(os.path.join(layout, "oci-layout")):
        run(["umoci", "init", "--layout", layout])
    run(["umoci", "new", "--image", f"{layout}:{tag}"])


def umoci_add_layer(layout: str, tag: str, tar: str, new_tag: str | None = None) -> None:
    """Append uncompressed tar *tar* as a layer (gzip-compressed by umoci) to *tag*, or as *new_tag*."""
    cmd = ["umoci", "raw", "add-layer", "--image", f"{layout}:{tag}"]
    if new_tag:
        cmd += ["--tag", new_tag]
    run(cmd + ["--history.created_by", f"lazyfs test layer {os.path.basename(tar)}", tar])


def umoci_config(layout: str, tag: str, *options: str) -> None:
    run(["umoci", "config", "--image", f"{layout}:{tag}", *options])


def umoci_unpack(layout: str, tag: str, bundle: str) -> str:
    """Unpack *tag* into *bundle*; its root filesystem directory."""
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", bundle])
    return os.path.join(bundle, "rootfs")


# ---------------------------------------------------------------- images written directly


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if compression == "zstd-frames":  # independent 64 KiB frames, as zstd:chunked-style tools write
        c = zstandard.ZstdCompressor()
        return b"".join(c.compress(data[i:i + (64 << 10)]) for i in range(0, len(data), 64 << 10))
    return data


def write_image(layout_dir: str, tag: str | None, tars: list[str], *, compression: str | list[str] = "gzip",
                docker: bool = False, config: dict | None = None, architecture: str = "amd64",
                variant: str = "") -> tuple[str, int, str]:
    """An image of the tar files *tars* in an OCI layout; ``(manifest digest, size, media type)``."""
    layout = OciLayout(layout_dir).ensure()
    style = "docker" if docker else "oci"
    compressions = compression if isinstance(compression, list) else [compression] * len(tars)
    layers, diff_ids = [], []
    for path, comp in zip(tars, compressions, strict=True):
        with open(path, "rb") as f:
            raw = f.read()
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob = _compress(raw, comp)
        desc = layout.put_bytes(blob, LAYER_TYPES[(style, comp)])
        layers.append(desc.to_json())
    doc = {"architecture": architecture, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
           "rootfs": {"type": "layers", "diff_ids": diff_ids},
           "history": [{"created_by": f"layer {i}"} for i in range(len(tars))]}
    if variant:
        doc["variant"] = variant
    doc.update(config or {})
    config_bytes = canonical_json(doc)
    config_desc = layout.put_bytes(config_bytes, DOCKER_CONFIG if docker else MEDIA_TYPE_CONFIG)
    media_type = DOCKER_MANIFEST if docker else MEDIA_TYPE_MANIFEST
    manifest = canonical_json({"schemaVersion": 2, "mediaType": media_type, "config": config_desc.to_json(),
                               "layers": layers})
    desc = layout.put_manifest(manifest, tag, media_type)
    return desc.digest, desc.size, media_type


def write_index(layout_dir: str, tag: str, manifests: list[tuple[str, int, str, str, str]]) -> str:
    """A multi-arch index of ``(digest, size, media type, os/arch[/variant])`` tuples under *tag*."""
    entries = []
    for digest, size, media_type, platform in manifests:
        parts = platform.split("/")
        plat = {"os": parts[0], "architecture": parts[1], **({"variant": parts[2]} if len(parts) > 2 else {})}
        entries.append({"mediaType": media_type, "digest": digest, "size": size, "platform": plat})
    data = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": entries})
    return OciLayout(layout_dir).put_manifest(data, tag, MEDIA_TYPE_INDEX).digest


def skopeo_copy(src: str, dst: str, *extra: str) -> None:
    """``skopeo copy`` without TLS verification or signatures (local test registries only)."""
    policy = os.path.join(tempfile.gettempdir(), "lazyfs-test-skopeo-policy.json")
    if not os.path.exists(policy):
        with open(policy, "w") as f:
            json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
    run(["skopeo", "--policy", policy, "copy", "--quiet", "--dest-tls-verify=false", "--src-tls-verify=false",
         *extra, src, dst])


# ---------------------------------------------------------------- Debian


def _mirrors() -> list[str]:
    found = ["http://deb.debian.org/debian"]
    for path in glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*"):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for url in re.findall(r"(?:URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(https?://\S+)", text, re.M):
            if "security" not in url and url.rstrip("/") not in found:
                found.append(url.rstrip("/"))
    return found


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def debian_minbase_rootfs(directory: str, suite: str = "bookworm", include: tuple[str, ...] = ()) -> None:
    """``debootstrap --variant=minbase`` into *directory* (tries deb.debian.org, then apt's mirrors)."""
    errors = []
    for mirror in _mirrors():
        shutil.rmtree(directory, ignore_errors=True)
        cmd = ["debootstrap", "--variant=minbase"] + ([f"--include={','.join(include)}"] if include else [])
        try:
            run(cmd + [suite, directory, mirror], timeout=1800)
            return
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{mirror}: {str(exc)[-300:]}")
    raise RuntimeError("debootstrap failed with every mirror:\n" + "\n".join(errors))


def debian_minbase_tar(cache_dir: str = DEFAULT_CACHE, suite: str = "bookworm") -> str:
    """A tar of a Debian minbase root (numeric owners, xattrs), built once and cached in *cache_dir*."""
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"debian-{suite}-minbase.tar")
    with _locked(out + ".lock"):
        if os.path.exists(out):
            return out
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="debootstrap-") as tmp:
            root = os.path.join(tmp, "root")
            debian_minbase_rootfs(root, suite)
            tar_tree(root, out + ".partial")
        os.replace(out + ".partial", out)
    return out


TAR_OPTIONS = ["--format=posix", "--pax-option=delete=atime,delete=ctime", "--xattrs", "--xattrs-include=*",
               "--acls", "--sparse", "--numeric-owner", "--sort=name"]


def debian_three_layers(work: str) -> tuple[list[str], str]:
    """The Debian minbase root as three layer tars under *work*: the root without /usr/share, then
    /usr/share, then a change layer (a rewritten dpkg status, a new /etc/lazyfs-layer, a whiteout of
    the first /usr/share/doc entry and an opaque /usr/share/man). Returns the tars and the name whited out."""
    tar = debian_minbase_tar()
    root = os.path.join(work, "debian-root")
    os.makedirs(root)
    run(["tar", "--extract", "--file", tar, "--directory", root, "--xattrs", "--xattrs-include=*", "--acls",
         "--numeric-owner", "--same-permissions"])
    l1, l2 = os.path.join(work, "debian-l1.tar"), os.path.join(work, "debian-l2.tar")
    run(["tar", "--create", "--file", l1, "--directory", root, *TAR_OPTIONS, "--exclude=./usr/share", "."])
    run(["tar", "--create", "--file", l2, "--directory", root, *TAR_OPTIONS, "./usr/share"])
    top = os.path.join(work, "debian-top")
    os.makedirs(os.path.join(top, "var", "lib", "dpkg"))
    shutil.copy2(os.path.join(root, "var", "lib", "dpkg", "status"), os.path.join(top, "var", "lib", "dpkg", "status"))
    os.makedirs(os.path.join(top, "etc"))
    with open(os.path.join(top, "etc", "lazyfs-layer"), "w") as f:
        f.write("the third layer\n")
    first_doc = sorted(os.listdir(os.path.join(root, "usr", "share", "doc")))[0]
    os.makedirs(os.path.join(top, "usr", "share", "doc"))
    open(os.path.join(top, "usr", "share", "doc", f".wh.{first_doc}"), "wb").close()  # whiteout
    os.makedirs(os.path.join(top, "usr", "share", "man"))
    open(os.path.join(top, "usr", "share", "man", ".wh..wh..opq"), "wb").close()  # opaque: man pages replaced
    with open(os.path.join(top, "usr", "share", "man", "README"), "w") as f:
        f.write("no manual pages here\n")
    l3 = tar_tree(top, os.path.join(work, "debian-l3.tar"))
    shutil.rmtree(root)
    shutil.rmtree(top)
    return [l1, l2, l3], first_doc
