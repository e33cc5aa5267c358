#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine (as root) to build and test lazyfs: system packages, a
# virtualenv at $REPO/.venv with lazyfs installed editable, /dev/fuse and fusectl.
#
# Idempotent: a second run skips apt and pip when the stamp files under .venv say nothing changed.
# Works from any cwd; meant to be executed (`bash scripts/setup.sh`), but sourcing it is safe too:
# everything runs in a subshell, so it neither changes the caller's options nor exits its shell.

# Debian packages the project needs. Append here; a changed list reinstalls on the next run.
LAZYFS_APT_PACKAGES=(
    fuse3 libfuse3-dev pkg-config gcc python3-dev e2fsprogs busybox-static
    docker-registry skopeo umoci apache2-utils qemu-utils zstd curl fio nbdkit nbdfuse
    kmod iproute2 util-linux
    # qemu guests for the VM tests: Debian's kernel + a busybox initrd built by tests.support.guest
    qemu-system-x86 linux-image-amd64 cpio
    # device-mapper's dmsetup: running mounts moved onto hydrated files (docs/warm.md §3; tested in a guest)
    dmsetup
    # the demo's Debian root filesystem
    debootstrap
    # the containerd snapshotter: real containerd + runc, and containerd's Go sources for its conformance suite
    containerd runc golang-go golang-github-containerd-containerd-dev
    # podman run --rootfs DIR:O on a lazyfs mount (contrib/podman); pulls conmon and containers-common
    podman
    # fleets (issue 16): S3 object storage (a one-node Ceph with radosgw), an HTTP cache tier (nginx slice)
    ceph-mon ceph-osd radosgw nginx
    # a fresh Debian 12 has python3 without ensurepip; `python3 -m venv` needs python3-venv
    python3 python3-venv ca-certificates
)

_lazyfs_setup() (
    set -euo pipefail

    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
    venv="$repo/.venv"
    python=${PYTHON:-python3}
    apt_stamp="$venv/.lazyfs-apt-packages"
    pip_stamp="$venv/.lazyfs-pip-install"

    say() { printf 'setup: %s\n' "$*"; }

    mkdir -p "$venv"
    # Two setups at once (parallel test runs) would race on apt and pip.
    if command -v flock >/dev/null; then
        exec 9>"$venv/.lazyfs-setup.lock"
        flock -w 1800 9
    fi

    # --- system packages -------------------------------------------------------------------
    wanted=$(printf '%s\n' "${LAZYFS_APT_PACKAGES[@]}" | sort -u)
    if [[ -f "$apt_stamp" && "$(cat "$apt_stamp")" == "$wanted" ]]; then
        say "apt packages up to date (stamp $apt_stamp)"
    elif [[ $EUID -ne 0 ]]; then
        say "not root: cannot install apt packages; install these by hand: ${LAZYFS_APT_PACKAGES[*]}" >&2
        exit 1
    else
        say "apt-get update"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=900 update -qq
        say "apt-get install ${#LAZYFS_APT_PACKAGES[@]} packages"
        apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${LAZYFS_APT_PACKAGES[@]}" >/dev/null
        printf '%s\n' "$wanted" >"$apt_stamp"
    fi

    # --- kernel interfaces (best effort: a container may forbid them) -----------------------
    if [[ $EUID -eq 0 ]]; then
        modprobe fuse 2>/dev/null || true
        modprobe loop 2>/dev/null || true
        if [[ ! -c /dev/fuse ]]; then
            say "creating /dev/fuse"
            mknod -m 0666 /dev/fuse c 10 229 || say "could not create /dev/fuse" >&2
        fi
        if [[ -d /sys/fs/fuse/connections ]] && ! mountpoint -q /sys/fs/fuse/connections; then
            mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null || true
        fi
    fi

    # --- virtualenv --------------------------------------------------------------------------
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "$python is missing or older than 3.11" >&2
        exit 1
    fi
    if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "creating virtualenv $venv with $(command -v "$python") ($("$python" --version 2>&1))"
        "$python" -m venv "$venv"
        rm -f "$pip_stamp"
    fi

    # Reinstall when pyproject.toml, setup.py, the C sources (the compiled READ path) or the
    # interpreter change; Python code changes need nothing (editable install).
    native_sum=$(cat "$repo/pyproject.toml" "$repo/setup.py" "$repo"/lazyfs/serve/fusekernel/native/*.c \
        "$repo"/lazyfs/serve/fusekernel/native/blake3/*.[ch] | sha256sum | cut -d' ' -f1)
    want_pip="$("$venv/bin/python" --version 2>&1) $native_sum editable=compat"
    if [[ -f "$pip_stamp" && "$(cat "$pip_stamp")" == "$want_pip" ]]; then
        say "python packages up to date (stamp $pip_stamp)"
    else
        # pip's output goes to a log, shown only when it fails: the progress lines stay short.
        pip_log="$venv/.lazyfs-pip.log"
        pip_quiet() {
            if ! "$venv/bin/python" -m pip "$@" >>"$pip_log" 2>&1; then
                cat "$pip_log" >&2
                say "pip $* failed (log: $pip_log)" >&2
                exit 1
            fi
        }
        : >"$pip_log"
        say "upgrading pip"
        pip_quiet install --upgrade pip
        say "pip install -e .[test,fuse] (pyfuse3 compiles from source: a few minutes the first time)"
        # compat: a plain path line in a .pth file. The default editable mode installs an import
        # hook whose import (pathlib and more) costs every Python start 15-20 ms: the CLI's and
        # the daemon's, both on a cold mount's critical path (BENCHMARKS.md).
        pip_quiet install -e "$repo[test,fuse]" --config-settings editable_mode=compat
        printf '%s\n' "$want_pip" >"$pip_stamp"
    fi
    # Byte-compile lazyfs as installing a wheel would: every `lazyfs` command (a mount's CLI, the
    # daemon) would otherwise compile the modules it imports on each start where bytecode is not
    # written (PYTHONDONTWRITEBYTECODE, a read-only tree): 20-40 ms of a cold mount (BENCHMARKS.md).
    # Python checks each .pyc against its source, so an edited module is simply compiled again.
    "$venv/bin/python" -m compileall -q "$repo/lazyfs"
    "$venv/bin/python" -c 'import lazyfs, pyfuse3, trio, pytest, lazyfs.serve.fusekernel._fastread' \
        || { say "the virtualenv cannot import lazyfs' dependencies" >&2; exit 1; }
    say "ready: $venv"
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    _lazyfs_setup "$@"
    exit $?
else
    _lazyfs_setup "$@"
fi
