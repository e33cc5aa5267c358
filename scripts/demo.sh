#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian 12 machine (as root):
# build a real root filesystem image, store it as lazyfs block layers, inspect,
# verify and flatten it, and check the result with e2fsck.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
bash "$repo/scripts/setup.sh" >/dev/null
export PATH="$repo/.venv/bin:$PATH"
work=${LAZYFS_DEMO_DIR:-/var/tmp/lazyfs-demo}
mkdir -p "$work"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a root filesystem tree (busybox)"
rm -rf "$work/tree" "$work/layout"
mkdir -p "$work/tree/bin" "$work/tree/etc"
cp /bin/busybox "$work/tree/bin/busybox"
for a in sh ls cat echo; do ln -s busybox "$work/tree/bin/$a"; done
echo 'NAME="lazyfs demo"' >"$work/tree/etc/os-release"

step "lazyfs create --from-dir: an ext4 image stored as chunked, compressed, blake3-named block layers"
lazyfs create "oci:$work/layout:v1" --from-dir "$work/tree"
step "lazyfs info"
lazyfs info "oci:$work/layout:v1"
step "lazyfs verify"
lazyfs verify "oci:$work/layout:v1"
step "lazyfs flatten + e2fsck -fn"
lazyfs flatten "oci:$work/layout:v1" "$work/flat.img"
e2fsck -fn "$work/flat.img"
