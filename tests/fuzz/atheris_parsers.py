"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers of wire input.

Each target feeds the fuzzer's bytes to one parser the way the wire would, past
the digest gates (the footer's blake3 and the manifest's meta-digest are
computed for the fuzzed bytes), and fails on anything but a one-line
FormatError or IntegrityError:

* ``metadata``: a layer tail (zstd frame of the bytes, footer) -> ``parse_anchored_tail``;
* ``msgpack``: the bytes as decompressed metadata -> ``decode_metadata`` + ``validate_metadata``;
* ``manifest``: the bytes as JSON -> manifest, index, platforms, config, converted layers, referrers;
* ``trace``: the bytes -> ``decode_trace``;
* ``tar``: the bytes as a layer tar -> ``scan_layer`` (headers, pax, sparse maps).

A longer run: seed a corpus with valid inputs, then fuzz (per target):

    .venv/bin/python -m tests.fuzz.atheris_parsers seed metadata CORPUS_DIR
    .venv/bin/python -m tests.fuzz.atheris_parsers metadata -max_total_time=600 -rss_limit_mb=1024 CORPUS_DIR

``-rss_limit_mb`` makes libFuzzer fail on any input that takes more memory than
that: the bounds are part of what is fuzzed. ``tests/fuzz/test_atheris.py``
runs every target briefly in CI.
"""

from __future__ import annotations

import sys
import tempfile

import atheris

# tarfile and msgpack's pure-Python fallback are where the header and map parsing happens
with atheris.instrument_imports(include=["lazyfs", "tarfile", "gzip"]):
    import io
    import tarfile

    import msgpack
    import zstandard

    from lazyfs.errors import FormatError, IntegrityError
    from lazyfs.fetch.trace import decode_trace
    from lazyfs.format.layer import (
        MetadataBudget,
        decode_metadata,
        encode_footer,
        parse_anchored_tail,
        tail_digest,
        validate_metadata,
    )
    from lazyfs.format.oci import parse_index, parse_manifest
    from lazyfs.format.ociimage import parse_converted_layers, parse_platforms, parse_source_config
    from lazyfs.image.referrers import _entries as referrer_entries
    from lazyfs.image.tarapply import scan_layer

BUDGET = 64 << 20


def _clean(call) -> None:
    try:
        call()
    except (FormatError, IntegrityError) as exc:
        if not str(exc) or "\n" in str(exc):
            raise AssertionError(f"not one line: {exc!r}") from None


def metadata(data: bytes) -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(data) if data[:1] != b"\x28" else data
    tail = frame + encode_footer(4096, frame)
    _clean(lambda: parse_anchored_tail(tail, tail_digest(tail), 4096 + len(tail), budget=MetadataBudget(BUDGET)))


def msgpack_(data: bytes) -> None:
    _clean(lambda: validate_metadata(decode_metadata(data, MetadataBudget(BUDGET)), 1 << 20))


def manifest(data: bytes) -> None:
    for parse in (parse_manifest, parse_index, parse_platforms, parse_source_config, parse_converted_layers,
                  referrer_entries):
        _clean(lambda: parse(data))


def trace(data: bytes) -> None:
    _clean(lambda: decode_trace(data))


_TAR = tempfile.NamedTemporaryFile(prefix="lazyfs-fuzz-", suffix=".tar")


def tar(data: bytes) -> None:
    _TAR.seek(0)
    _TAR.truncate()
    _TAR.write(data)
    _TAR.flush()
    _clean(lambda: scan_layer(_TAR.name, "none", "fuzzed layer", limit=16 << 20))


TARGETS = {"metadata": metadata, "msgpack": msgpack_, "manifest": manifest, "trace": trace, "tar": tar}


def seeds(target: str) -> list[bytes]:
    """Valid inputs of *target*, for a corpus to start from."""
    from tests.format.test_fuzz import VALID_MANIFEST, VALID_METADATA, VALID_TAR
    from lazyfs.fetch.trace import encode_trace
    from lazyfs.format.layer import ChunkLocation

    raw = zstandard.ZstdDecompressor().decompress(VALID_METADATA)
    return {
        "metadata": [raw, VALID_METADATA],
        "msgpack": [raw],
        "manifest": [VALID_MANIFEST],
        "trace": [encode_trace([ChunkLocation(bytes(32), "sha256:" + "a" * 64, 0, 100, 4096, 1)] * 3)],
        "tar": [VALID_TAR],
    }[target]


def main(argv: list[str]) -> None:
    if len(argv) == 4 and argv[1] == "seed" and argv[2] in TARGETS:
        import hashlib
        import os

        os.makedirs(argv[3], exist_ok=True)
        for data in seeds(argv[2]):
            with open(os.path.join(argv[3], hashlib.sha1(data).hexdigest()), "wb") as f:
                f.write(data)
        return
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
