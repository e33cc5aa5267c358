"""The daemon's glibc malloc settings (lazyfs/serve/malloc.py), made with mallopt at its start.

The arena bound is measured: eight live threads take turns allocating and freeing a 16 MiB
buffer. With one arena per thread each keeps its freed buffer (below the 64 MiB trim threshold),
and the peak RSS is all eight (140-147 MiB here); in two arenas the next thread reuses what the last
one freed (44-47 MiB). Broken on purpose once (2026-12-06): with ``M_ARENA_MAX`` left out of
``SETTINGS``, ``test_two_arenas_bound_what_threads_keep`` failed (140 MiB both ways).
"""

import json
import os
import subprocess
import sys

from lazyfs.serve import malloc
from tests.serve.conftest import ROOT

EXPERIMENT = r'''
import json, sys, threading
from lazyfs.serve import malloc
applied = malloc.tune({"MALLOC_ARENA_MAX": "left to glibc"} if sys.argv[1] == "default" else {})
N, SIZE = 8, 16 << 20
turn = [threading.Event() for _ in range(N + 1)]
done = threading.Event()

def worker(i):
    b = bytearray(64)  # the thread's first allocation picks its arena
    del b
    turn[i].wait()
    buf = bytearray(SIZE)  # zero-filled: every page touched
    del buf
    turn[i + 1].set()
    done.wait()  # stay alive (and attached to the arena) until every thread has had its turn

threads = [threading.Thread(target=worker, args=(i,)) for i in range(N)]
for t in threads:
    t.start()
turn[0].set()
turn[N].wait(timeout=60)
done.set()
for t in threads:
    t.join()
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"applied": applied, "hwm": hwm}))
'''


def run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", EXPERIMENT, mode], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**env, "PYTHONPATH": ROOT}, check=True).stdout
    return json.loads(out)


def test_two_arenas_bound_what_threads_keep():
    tuned, default = run("tuned"), run("default")
    print(f"peak RSS: {tuned['hwm'] >> 20} MiB in 2 arenas, {default['hwm'] >> 20} MiB with glibc's default")
    assert default["hwm"] - tuned["hwm"] > 64 << 20, (tuned, default)  # at least four kept buffers fewer
    assert tuned["applied"] == {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 64 << 20,
                                "MALLOC_ARENA_MAX": 2}


def test_an_environment_variable_wins():
    """A user's MALLOC_* variable (glibc read it at start-up) is left alone."""
    applied = malloc.tune({"MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "4"})
    assert applied == {"MALLOC_MMAP_THRESHOLD_": 32 << 20}
