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
"""

import os
import subprocess
import sys

from tests.serve.conftest import ROOT

# what only the daemon (or a registry command) needs: none of it may load for a mount
DAEMON_ONLY = ("httpx", "httpcore", "lazyfs.serve.daemon", "lazyfs.serve.host", "lazyfs.image",
               "lazyfs.fetch", "lazyfs.device", "pyfuse3", "prometheus_client", "zstandard", "blake3",
               "trio", "lazyfs.serve.system", "lazyfs.serve.controlserver", "lazyfs.serve.hydrated")


def test_the_mount_path_loads_no_daemon_code_and_no_trio():
    code = ("import sys, lazyfs.cli, lazyfs.serve.mount; "
            "print(len(sys.modules)); print(*sorted(sys.modules), sep='\\n')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout.split()
    loaded = set(out[1:])
    # the import really happened (and msgspec, which the config needs, shows the list is complete)
    assert {"lazyfs.cli", "lazyfs.serve.mount", "lazyfs.serve.syscmd", "msgspec"} <= loaded
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in DAEMON_ONLY))
    assert not heavy, heavy
    print(f"modules after importing lazyfs.cli and lazyfs.serve.mount: {out[0]}")
