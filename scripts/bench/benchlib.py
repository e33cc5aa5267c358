"""Helpers the benchmark scripts share (run from this folder: ``python scripts/bench/X.py``
puts it on ``sys.path``, so ``from benchlib import ...`` works like ``from benchnet import ...``).

Only what several scripts did the same way lives here; a script's own measurements stay in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (root only: a
    warning, not an error, without it, so an unprivileged dry run still runs)."""
    subprocess.run(["sync"], timeout=300)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as exc:
        print(f"benchmark: cannot drop caches ({exc}): later reads may be warm", file=sys.stderr)


def run_header() -> dict:
    """What every result starts with: the date, the machine and its load when the run began."""
    return {"date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.uname().nodename}, {os.cpu_count()} cores, {os.uname().release}",
            "loadavg_start": os.getloadavg()}


def print_results(results: dict, path: str | None) -> None:
    """Print *results* as indented JSON, and write the same text to *path* if given."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def parse_settings(items: list[str]) -> dict:
    """``--set KEY=JSON`` arguments as config settings, e.g. ``export_readahead=1048576``."""
    return {key: json.loads(value) for key, value in (item.split("=", 1) for item in items)}


def finish_run(results: dict, path: str | None) -> None:
    """Record and print the machine's load as the run ends, then write *results* as JSON to *path*
    if given (the figures themselves were printed as they came)."""
    results["loadavg_end"] = os.getloadavg()
    print(f"\nload average {results['loadavg_start'][0]:.2f} at the start, {results['loadavg_end'][0]:.2f} "
          f"at the end", flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def push_tree_image(tree: str, work: str, registry: str, name: str) -> tuple[str, str]:
    """The ext4 image ``work/name.ext4`` of *tree* (which is removed then), made a lazyfs image
    ``oci:work/layout:name`` by ``lazyfs create`` and pushed by ``lazyfs push`` to
    ``registry/bench/name:v1``: (that ext4 file, that reference)."""
    from lazyfs.image.local import mkfs_from_dir  # the scripts put the checkout on sys.path

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raw = os.path.join(work, f"{name}.ext4")
    mkfs_from_dir(tree, raw)
    shutil.rmtree(tree)
    layout, ref = f"oci:{os.path.join(work, 'layout')}:{name}", f"{registry}/bench/{name}:v1"
    cli = [sys.executable, "-m", "lazyfs.cli"]
    env = {**os.environ, "PYTHONPATH": root}
    for args in (["create", layout, "--from-file", raw], ["push", layout, ref, "--plain-http", registry]):
        subprocess.run([*cli, *args], check=True, capture_output=True, env=env, cwd=root, timeout=900)
    return raw, ref


def detach_loops_under(prefix: str) -> list[str]:
    """Detach every loop device whose backing file is under *prefix* (a directory this run owns);
    return them. Found in sysfs, not with ``losetup -a`` (see ``loop_backing_files``)."""
    from tests.support.cleanup import loops_under  # the scripts put the checkout on sys.path

    detached = [line.split(":")[0] for line in loops_under(prefix)]
    for dev in detached:
        subprocess.run(["losetup", "-d", dev], timeout=60)
    return detached


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait for *proc* to exit (after it was asked to), killing it after *timeout* seconds."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def nbdfuse_file(raw: str, directory: str, filters: tuple[str, ...] = (),
                 plugin_args: tuple[str, ...] = (), *, plugin: tuple[str, ...] | None = None,
                 prefix: tuple[str, ...] = ()) -> Iterator[str]:
    """*raw* served read-only by nbdkit's file plugin through nbdfuse (a C FUSE peer of lazyfs):
    yields the path of the FUSE file ``directory/nbd``; unmounts and stops nbdfuse on exit.
    *filters* go before the plugin (``--filter=log``), *plugin_args* after it (``logfile=...``).
    *plugin* replaces ``("file", raw)`` (e.g. ``("curl", "url=...")``); *prefix* runs nbdfuse under
    a command prefix (e.g. ``nsenter --net=...``)."""
    os.makedirs(directory)
    plugin = ("file", raw) if plugin is None else plugin
    proc = subprocess.Popen([*prefix, "nbdfuse", "-r", directory, "--command", "nbdkit", "-s", "-r", *filters,
                             *plugin, *plugin_args], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(directory, "nbd")):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("nbdfuse did not come up")
            time.sleep(0.05)
        yield os.path.join(directory, "nbd")
    finally:
        subprocess.run(["fusermount3", "-u", directory], timeout=60)
        stop_process(proc)
