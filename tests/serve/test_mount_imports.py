"""What `lazyfs mount`, `umount`, `export` and `stats` load before they talk to a running daemon.

Every cold start waits for the CLI's imports (BENCHMARKS.md, issue 14). The mount path used to
import ``lazyfs.serve.daemon`` (for one helper), and with it the registry client, httpx, the image
and device code: 466 modules against 294. ``import lazyfs.cli, lazyfs.serve.mount``, 10 interleaved
runs under load 3.5: median 0.41 s before, 0.19 s after (BENCHMARKS.md). Counts modules, not seconds.
Broken on purpose once (2026-12-06) by importing lazyfs.serve.daemon in lazyfs/serve/mount.py again:
this test failed naming blake3, httpcore, httpx, lazyfs.image and lazyfs.serve.daemon.

Nor does the mount path load trio (0.21 s of a cold start): it runs losetup, mount and umount
through ``syscmd``'s blocking runner and talks to the daemon with ``control.call``, a plain socket:
168 modules against 279, cold median 0.20 s against 0.31 s (BENCHMARKS.md). msgspec stays: the
config file is validated with it. Broken on purpose once (2026-12-06) by importing trio at the top
of lazyfs/serve/mount.py again: this test failed naming trio and its submodules (trio, trio._abc,
trio._channel, trio._core, ...).

Nor what only other commands or other branches use (issue 14, second pass): ``ssl`` (a registry's
CA bundle or client certificate), ``tomllib`` (a TOML config file), ``logging`` (a line logged), the
reference parser (a registry entry in the config), ``lazyfs.nursery`` (a failed command), nor
``shutil``, which argparse imported for the terminal's width, with bz2, lzma and zlib. Importing,
parsing a mount's arguments and loading a JSON config: 151 modules against 175. Cold (page cache of
the interpreter's files evicted), 10 interleaved runs, load 2-2.5: ``import lazyfs.cli,
lazyfs.serve.mount`` median 0.114 s against 0.138 s, ``lazyfs stats`` (no daemon) 0.114 against
0.146 s (BENCHMARKS.md). Broken on purpose once (2026-12-07) by importing ssl at the top of
lazyfs/config.py again: the second test failed naming ssl; with the previous lazyfs/cli.py, naming
bz2, lazyfs.nursery, logging, lzma and shutil.
"""

import json
import os
import subprocess
import sys

from tests.serve.conftest import ROOT

# what only the daemon (or a registry command) needs: none of it may load for a mount
DAEMON_ONLY = ("httpx", "httpcore", "lazyfs.serve.daemon", "lazyfs.serve.host", "lazyfs.image",
               "lazyfs.fetch", "lazyfs.device", "pyfuse3", "prometheus_client", "zstandard", "blake3",
               "trio", "lazyfs.serve.system", "lazyfs.serve.controlserver", "lazyfs.serve.hydrated")
# what only other commands or other branches need, imported where they are used, and shutil, which
# argparse imported for the terminal's width (cli._HelpFormatter) with bz2, lzma and zlib (issue 14)
OTHER_BRANCHES = ("ssl", "tomllib", "logging", "lazyfs.format.reference", "lazyfs.nursery", "shutil", "bz2", "lzma")


def python_output(code: str, *args: str) -> list[str]:
    """The words *code* prints, run by a fresh interpreter with the checkout on its path."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout.split()


def test_the_mount_path_loads_no_daemon_code_and_no_trio():
    code = ("import sys, lazyfs.cli, lazyfs.serve.mount; "
            "print(len(sys.modules)); print(*sorted(sys.modules), sep='\\n')")
    out = python_output(code)
    loaded = set(out[1:])
    # the import really happened (and msgspec, which the config needs, shows the list is complete)
    assert {"lazyfs.cli", "lazyfs.serve.mount", "lazyfs.serve.syscmd", "msgspec"} <= loaded
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in DAEMON_ONLY))
    assert not heavy, heavy
    print(f"modules after importing lazyfs.cli and lazyfs.serve.mount: {out[0]}")


def test_the_mount_path_loads_nothing_only_other_commands_need(tmp_path):
    # what `lazyfs mount IMAGE DIR --config FILE` does before it talks to the daemon: import the
    # mount path, parse the arguments, load a JSON config file (one without registries)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run")}))
    code = ("import sys; start = set(sys.modules)\n"
            "import lazyfs.cli, lazyfs.serve.mount\n"
            "args = lazyfs.cli.build_parser().parse_args(['mount', 'img', 'dir', '--config', sys.argv[1]])\n"
            "assert lazyfs.cli._config(args).run_dir == sys.argv[2]\n"
            "print(*sorted(set(sys.modules) - start), sep='\\n')")  # what the interpreter's start loaded never counts
    loaded = set(python_output(code, str(config), str(tmp_path / "run")))
    assert {"lazyfs.cli", "lazyfs.config", "lazyfs.serve.mount", "argparse", "msgspec"} <= loaded
    needless = sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in DAEMON_ONLY + OTHER_BRANCHES))
    assert not needless, needless
    print(f"modules the mount path adds to those of the interpreter's start: {len(loaded)}")


# what only `lazyfs index` (the builder) needs: its working ext4, tar applier and block map
INDEX_BUILDER = ("lazyfs.image.index", "lazyfs.image.convert", "lazyfs.image.tarapply", "lazyfs.image.workfs",
                 "lazyfs.image.blockmap", "lazyfs.image.build")


def test_opening_an_image_through_its_index_loads_no_builder():
    """The daemon opens an ordinary image through its index with ``lazyfs.image.indexed``: it used to import
    the builder (``lazyfs.image.index``, which imports ``convert``), 72 ms of a cold start's attach on this
    VM, where opening the Debian image's index in process took 116 ms in all (55 ms after). Broken on
    purpose once (2026-12-07) by importing ``lazyfs.image.convert`` in indexed.py again:
    this test failed naming the builder's modules."""
    loaded = set(python_output("import sys, lazyfs.image.indexed; print(*sorted(sys.modules), sep='\\n')"))
    assert "lazyfs.image.indexed" in loaded and "lazyfs.image.image" in loaded
    builder = sorted(m for m in loaded if m in INDEX_BUILDER)
    assert not builder, builder


def test_the_daemon_start_runs_no_ldconfig():
    """``ctypes.util.find_library`` runs ``ldconfig -p`` in a subprocess. Three lazyfs modules called it at
    import (libc twice, libz once): cold, the daemon's start went from a median of 0.670 s to 0.475 s
    without them (17 starts each, alternating, BENCHMARKS.md). trio calls it once for itself, before
    the count starts. Broken on purpose once (2026-12-07) by loading libz through find_library again: this
    test failed naming lazyfs/format/zran.py."""
    code = ("import ctypes.util, traceback, trio\n"
            "calls = []\n"
            "ctypes.util.find_library = lambda name: calls.append(traceback.extract_stack()[-2].filename)\n"
            "import lazyfs.serve.daemon, lazyfs.format.zran, lazyfs.device.writable.sparse, lazyfs.serve.fusekernel.session\n"
            "print(*calls, sep='\\n')")
    out = python_output(code)
    assert not out, out


def test_the_daemon_imports_with_the_collector_off_and_freezes_what_it_made():
    """``lazyfs.cli.import_daemon`` imports the daemon with the cyclic garbage collector off: 87
    collections ran during that import, each walking the tens of thousands of objects it had made
    so far (25-85 ms of the import, 20-25 runs each, alternating, BENCHMARKS.md). It then freezes
    them, so no full collection of the long-lived daemon walks them again (17-29 ms each before).
    Broken on purpose once (2026-12-08) by dropping the ``gc.disable()``: this test failed with 87
    collections."""
    code = ("import gc, lazyfs.cli\n"
            "starts = []\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start' and starts.append(info['generation']))\n"
            "lazyfs.cli.import_daemon()\n"
            "print(len(starts), gc.get_freeze_count(), gc.isenabled())")
    out = python_output(code)
    collections, frozen, enabled = int(out[0]), int(out[1]), out[2]
    assert collections == 0, f"{collections} collections ran during the daemon's import"
    assert frozen > 10_000, frozen  # the modules, classes and functions the import made
    assert enabled == "True"  # the daemon itself runs with the collector on


def test_the_interpreter_start_loads_no_editable_import_hook():
    """``scripts/setup.sh`` installs lazyfs editable in setuptools' compat mode: a path line in a .pth
    file. The default mode installs an import hook that every start of the virtualenv's Python
    imports, pathlib and importlib.util with it: 15-20 ms of each ``lazyfs`` command's start and of
    the daemon's, both on a cold mount's critical path (a bare start, page cache dropped: 67 ms
    against 43 ms, BENCHMARKS.md). Broken on purpose once (2026-12-08) by installing in the default
    mode again: this test failed naming ``__editable___lazyfs_0_1_0_finder``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import sys; print(*sorted(sys.modules), sep='\\n')"],
                         capture_output=True, text=True, timeout=120, cwd="/", env=env, check=True).stdout.split()
    hooks = [m for m in out if m.startswith("__editable__")]
    assert not hooks, f"{hooks}: install lazyfs with --config-settings editable_mode=compat (scripts/setup.sh)"
    assert "pathlib" not in out
