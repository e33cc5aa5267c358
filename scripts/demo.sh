#!/usr/bin/env bash
# lazyfs, end to end, on a fresh Debian 12 machine (as root):
#   1. start a local OCI registry on 127.0.0.1,
#   2. build a real Debian root filesystem (debootstrap minbase; cached) as a lazyfs image and push it,
#   3. mount it lazily and run a program from it,
#   4. show how long the mount took and how little was fetched, then unmount.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
bash "$repo/scripts/setup.sh" | sed 's/^/  /'
export PATH="$repo/.venv/bin:$PATH"
work=${LAZYFS_DEMO_DIR:-/var/tmp/lazyfs-demo}
cache=${LAZYFS_DEMO_CACHE:-/var/cache/lazyfs-demo}
mkdir -p "$work" "$cache"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
reg="127.0.0.1:$port"
cat >"$work/config.json" <<JSON
{"run_dir": "$work/run", "state_dir": "$work/state", "cache_root": "$work/cache",
 "writable_root": "$work/writable", "registries": [{"host": "$reg", "plain_http": true}]}
JSON
export LAZYFS_CONFIG="$work/config.json"
cleanup() {
    set +e
    lazyfs umount "$work/mnt" >/dev/null 2>&1
    [[ -S "$work/run/lazyfs.sock" ]] && python3 -c "from lazyfs.serve.control import call; call('$work/run/lazyfs.sock', 'stop')" >/dev/null 2>&1
    [[ -n "${registry_pid:-}" ]] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
}
trap cleanup EXIT

step "1. a local OCI registry on $reg (Debian's docker-registry)"
rm -rf "$work/registry" "$work/cache" "$work/run" "$work/state" "$work/layout"
mkdir -p "$work/registry" "$work/mnt"
cat >"$work/registry.yml" <<YAML
version: 0.1
storage: {filesystem: {rootdirectory: $work/registry}, delete: {enabled: true}}
http: {addr: "$reg"}
log: {level: error}
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$reg/v2/" >/dev/null || { echo "registry did not start; see $work/registry.log"; exit 1; }

step "2. a Debian root filesystem (debootstrap --variant=minbase bookworm), as a lazyfs image"
if [[ ! -f "$cache/debian-minbase.tar" ]]; then
    rm -rf "$cache/rootfs"
    debootstrap --variant=minbase bookworm "$cache/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
        || { echo "debootstrap failed; see $work/debootstrap.log"; exit 1; }
    tar -C "$cache/rootfs" -cf "$cache/debian-minbase.tar.tmp" . && mv "$cache/debian-minbase.tar.tmp" "$cache/debian-minbase.tar"
    rm -rf "$cache/rootfs"
fi
rm -rf "$work/rootfs" && mkdir -p "$work/rootfs" && tar -C "$work/rootfs" -xf "$cache/debian-minbase.tar"
lazyfs create "oci:$work/layout:bookworm" --from-dir "$work/rootfs" | grep -E "virtual_size|chunks_stored|stored_bytes"
lazyfs push "oci:$work/layout:bookworm" "$reg/demo/debian:bookworm" | grep -E "image|bytes"

step "3. lazyfs mount $reg/demo/debian:bookworm (fetches metadata only), then run a program from it"
lazyfs mount "$reg/demo/debian:bookworm" "$work/mnt"
chroot "$work/mnt" /bin/sh -c '. /etc/os-release; echo "hello from $PRETTY_NAME"; dpkg -l | wc -l | sed "s/^/installed packages: /"'

step "4. what was fetched"
lazyfs stats "$work/mnt"
python3 - "$work" <<'PY'
import json, subprocess, sys
work = sys.argv[1]
stats = json.loads(subprocess.run(["lazyfs", "stats", f"{work}/mnt", "--json"], capture_output=True, text=True, check=True).stdout)
size, fetched = stats["size"], stats["scheduler"]["bytes_fetched"]
print(f"\nfetched {fetched / 1e6:.1f} MB (compressed, readahead included) of a {size / 1e6:.0f} MB image "
      f"({fetched / size:.1%}); the program read {stats['device']['bytes_read'] / 1e6:.1f} MB")
PY
lazyfs umount "$work/mnt"
