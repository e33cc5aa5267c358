#!/usr/bin/env python3
"""Benchmark `lazyfs convert` on a real Debian root (one run).

* convert time vs `umoci unpack` of the same image (page cache dropped before each);
* registry bytes of the lazyfs image vs the gzip OCI image it came from;
* image v2 = the same Debian + one package (python3-minimal, installed with dpkg
  from Debian's .debs): new bytes pushed by converting v2 after v1, divided by
  the installed size of what the package added.

Needs root, network to deb.debian.org (debootstrap once, cached; apt-get
download), umoci, skopeo, docker-registry.
Usage: scripts/bench/convert.py [--workdir DIR] [--package NAME] [--json FILE]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import drop_caches, print_results  # noqa: E402
from tests.support.ociimages import (  # noqa: E402
    debian_minbase_tar,
    run,
    skopeo_copy,
    umoci_add_layer,
    umoci_new,
    umoci_unpack,
)
from tests.support.registry import running_registry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(cmd: list[str]) -> tuple[str, float]:
    drop_caches()
    t = time.perf_counter()
    out = run(cmd, timeout=3600, cwd=ROOT)
    return out, time.perf_counter() - t


def lazyfs(config: str, *args: str) -> tuple[dict, float]:
    out, seconds = timed([sys.executable, "-m", "lazyfs.cli", *args, "--json", "--config", config])
    return json.loads(out), seconds


def image_bytes(layout: str, tag: str) -> dict:
    """Bytes a registry stores for *tag* of an OCI layout: manifest, config and layers."""
    index = json.load(open(os.path.join(layout, "index.json")))
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blob = lambda d: os.path.join(layout, "blobs", "sha256", d.split(":")[1])  # noqa: E731
    manifest = json.load(open(blob(desc["digest"])))
    layers = [layer["size"] for layer in manifest["layers"]]
    return {"manifest": desc["size"], "config": manifest["config"]["size"], "layers": layers,
            "total": desc["size"] + manifest["config"]["size"] + sum(layers)}


def add_package(layout: str, work: str, package: str) -> dict:
    """Tag v2: v1 plus *package* (and what it depends on that minbase lacks), installed with dpkg."""
    bundle = os.path.join(work, "bundle-v2")
    rootfs = umoci_unpack(layout, "v1", bundle)
    before = set(run(["chroot", rootfs, "dpkg-query", "-W", "-f", "${Package}\n"]).split())
    debs = os.path.join(rootfs, "tmp", "debs")
    os.makedirs(debs)
    wanted = [package]
    # the dependency closure missing from minbase, resolved by the host's apt (same suite)
    depends = run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                   "--no-breaks", "--no-replaces", "--no-enhances", package])
    for line in depends.splitlines():
        name = line.strip().split(":")[-1].strip().strip("<>")
        if line and not line.startswith(" ") and name not in before and name not in wanted:
            wanted.append(name)
    wanted = [w for w in wanted if w not in before]
    run(["apt-get", "download", *wanted], cwd=debs)
    for attempt in range(3):  # pre-dependencies: each round installs what it can
        try:
            run(["chroot", rootfs, "sh", "-c", "dpkg -i /tmp/debs/*.deb"])
            break
        except RuntimeError:
            if attempt == 2:
                raise
    shutil.rmtree(debs)
    after = set(run(["chroot", rootfs, "dpkg-query", "-W", "-f", "${Package}\n"]).split())
    added = sorted(after - before)
    sizes = {}
    for name in added:
        sizes[name] = int(run(["chroot", rootfs, "dpkg-query", "-W", "-f", "${Installed-Size}", name])) * 1024
    run(["umoci", "repack", "--image", f"{layout}:v2", bundle])
    return {"package": package, "added": added, "installed_bytes": sizes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one under /var/tmp)")
    parser.add_argument("--package", default="python3-minimal")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (umoci unpack and lazyfs convert mount filesystems)", file=sys.stderr)
        return 1
    work = args.workdir or tempfile.mkdtemp(prefix="lazyfs-bench-convert-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    results: dict = {}
    try:
        tar = debian_minbase_tar()
        layout = os.path.join(work, "debian")
        umoci_new(layout, "v1")
        umoci_add_layer(layout, "v1", tar)
        results["tar_bytes"] = os.path.getsize(tar)
        results["v2"] = add_package(layout, work, args.package)

        config = os.path.join(work, "config.json")
        with running_registry(os.path.join(work, "registry")) as reg:
            with open(config, "w") as f:
                json.dump({"run_dir": f"{work}/run", "state_dir": f"{work}/state", "cache_root": f"{work}/cache",
                           "writable_root": f"{work}/writable",
                           "registries": [{"host": reg.registry, "plain_http": True}]}, f)

            _, umoci_seconds = timed(["umoci", "unpack", "--image", f"{layout}:v1", os.path.join(work, "bundle-v1")])
            summary, convert_seconds = lazyfs(config, "convert", f"oci:{layout}:v1", f"oci:{work}/out:v1",
                                              "--no-cache")
            results["unpack"] = {"umoci_unpack_s": round(umoci_seconds, 2),
                                 "lazyfs_convert_s": round(convert_seconds, 2),
                                 "lazyfs_convert_in_process_s": summary["seconds"],
                                 "lazyfs_phases_s": summary["layers"][0].get("phases"),
                                 "ratio": round(convert_seconds / umoci_seconds, 2)}
            results["bytes"] = {"gzip_oci": image_bytes(layout, "v1"), "lazyfs": image_bytes(f"{work}/out", "v1"),
                                "virtual_size": summary["virtual_size"]}
            sizes = results["bytes"]
            sizes["ratio"] = round(sizes["lazyfs"]["total"] / sizes["gzip_oci"]["total"], 3)

            for v in ("v1", "v2"):
                skopeo_copy(f"oci:{layout}:{v}", f"docker://{reg.registry}/app:{v}")
            first, _ = lazyfs(config, "convert", f"{reg.registry}/app:v1", f"{reg.registry}/app:v1-lazyfs")
            second, second_seconds = lazyfs(config, "convert", f"{reg.registry}/app:v2",
                                            f"{reg.registry}/app:v2-lazyfs")
            installed = sum(results["v2"]["installed_bytes"].values())
            gzip_v2 = image_bytes(layout, "v2")
            manifest_bytes = len(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                      f"docker://{reg.registry}/app:v2-lazyfs"]).encode())
            pushed = second["bytes_pushed"] + manifest_bytes
            results["update"] = {
                "v1_layers_pushed": first["layers_pushed"],
                "v2_layers_converted": second["layers_converted"], "v2_layers_pushed": second["layers_pushed"],
                "v2_convert_s": round(second_seconds, 2),
                "v2_phases_s": second["layers"][-1].get("phases"),
                "v2_materialize_s": second["materialize_seconds"],
                "v2_new_bytes_pushed": pushed,
                "gzip_oci_v2_new_bytes": gzip_v2["layers"][-1] + gzip_v2["config"] + gzip_v2["manifest"],
                "installed_bytes": installed,
                "pushed_per_installed": round(pushed / installed, 3),
                "changed_blocks_bytes": second["layers"][-1]["changed_bytes"],
            }
    finally:
        for bundle in glob.glob(os.path.join(work, "bundle-*")):
            shutil.rmtree(bundle, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
