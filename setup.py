"""The one compiled module of lazyfs: the FUSE worker threads' READ path (docs/warm.md §4).

Everything else is in pyproject.toml. BLAKE3's C library (vendored, version in its README) is
built with its portable and SSE2 code only: SSE2 is part of x86-64, so the module runs on any
x86-64 host, and SSE2 hashes the four 1 KiB chunks of a 4 KiB block in parallel.
"""

import platform

from setuptools import Extension, setup

NATIVE = "lazyfs/serve/fusekernel/native"
BLAKE3 = ["blake3.c", "blake3_dispatch.c", "blake3_portable.c"]
BLAKE3_OFF = ["BLAKE3_NO_SSE41", "BLAKE3_NO_AVX2", "BLAKE3_NO_AVX512"]
if platform.machine() in ("x86_64", "AMD64"):
    BLAKE3.append("blake3_sse2.c")
else:
    BLAKE3_OFF.append("BLAKE3_NO_SSE2")

setup(ext_modules=[Extension(
    "lazyfs.serve.fusekernel._fastread",
    sources=[f"{NATIVE}/fastread.c"] + [f"{NATIVE}/blake3/{name}" for name in BLAKE3],
    include_dirs=[NATIVE],
    define_macros=[(name, "1") for name in BLAKE3_OFF],
    extra_compile_args=["-O3", "-Wall"],
)])
