"""Content digests: the one place that says what a valid digest string or chunk name is. No I/O.

Two kinds of names run through lazyfs:

* **OCI digests** (``algorithm:hex``) name blobs, manifests, configs and layer
  tails. lazyfs writes only ``sha256``; it reads ``sha256`` and ``sha512``
  where the distribution spec allows either (registry references).
* **Chunk names** are the 32-byte blake3-256 digest of a chunk's raw bytes
  (docs/format.md §3), carried as ``bytes``.

Every parser checks a digest with one of the functions here, so the grammar, the
error text and the hex case rule (lowercase only) are the same everywhere.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from lazyfs.errors import FormatError

__all__ = [
    "CHUNK_DIGEST_SIZE",
    "chain_ids",
    "check_chunk_digest",
    "check_digest",
    "check_sha256",
    "digest_of",
    "hasher_for",
    "is_chunk_digest",
    "is_sha256",
    "sha256_digest",
    "split_digest",
]

CHUNK_DIGEST_SIZE = 32  # blake3-256
# The algorithms lazyfs can verify, with the exact shape of their encoded part (lowercase hex).
_ENCODED = {
    "sha256": re.compile(r"[0-9a-f]{64}"),
    "sha512": re.compile(r"[0-9a-f]{128}"),
}
# The OCI image spec's digest grammar: algorithm ":" encoded. Wider than what lazyfs verifies;
# used where a name only has to be a digest-shaped path component (a layout's blob file).
_OCI_GRAMMAR = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")


def is_sha256(value: object) -> bool:
    """True if *value* is a string ``sha256:<64 lowercase hex>``."""
    return isinstance(value, str) and value[:7] == "sha256:" and _ENCODED["sha256"].fullmatch(value, 7) is not None


def check_sha256(value: object, what: str = "digest") -> str:
    """Return *value* if it is ``sha256:<64 lowercase hex>``, else FormatError naming *what*."""
    if not is_sha256(value):
        raise FormatError(f"{what} {value!r} is not sha256:<64 hex>")
    return value  # type: ignore[return-value]


def check_digest(value: object, what: str = "digest") -> str:
    """Return *value* if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>``, else FormatError."""
    if not isinstance(value, str):
        raise FormatError(f"{what}: expected a string, got {type(value).__name__}")
    algorithm, sep, encoded = value.partition(":")
    pattern = _ENCODED.get(algorithm)
    if not sep or pattern is None:
        raise FormatError(f"{what} {value!r}: unsupported or missing algorithm (want sha256:<hex>)")
    if not pattern.fullmatch(encoded):
        raise FormatError(f"{what} {value!r}: not lowercase hex of the right length for {algorithm}")
    return value


def split_digest(value: object) -> tuple[str, str] | None:
    """``(algorithm, encoded)`` if *value* follows the OCI digest grammar, else None.

    Both parts are safe as path components (no ``/``, no ``..``).
    """
    m = _OCI_GRAMMAR.fullmatch(value) if isinstance(value, str) else None
    return None if m is None else (m.group(1), m.group(2))


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """``sha256:<hex>`` of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> str:
    """The OCI digest string of *data* with *algorithm* (one lazyfs can verify)."""
    if algorithm not in _ENCODED:
        raise FormatError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def hasher_for(digest: str):
    """A fresh hashlib object for the algorithm of *digest* (FormatError if *digest* is not valid)."""
    return hashlib.new(check_digest(digest).partition(":")[0])


def is_chunk_digest(value: object) -> bool:
    """True if *value* is a chunk name: exactly CHUNK_DIGEST_SIZE bytes."""
    return type(value) is bytes and len(value) == CHUNK_DIGEST_SIZE


def check_chunk_digest(value: object, what: str = "chunk digest") -> bytes:
    """Return *value* if it is a chunk name, else FormatError naming *what*."""
    if not is_chunk_digest(value):
        shown = f"{len(value)} bytes" if isinstance(value, bytes | bytearray) else type(value).__name__
        raise FormatError(f"{what}: expected {CHUNK_DIGEST_SIZE} bytes of blake3, got {shown}")
    return value  # type: ignore[return-value]


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """The OCI chain id of every prefix of *diff_ids*.

    ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)) (OCI image spec).
    """
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out
