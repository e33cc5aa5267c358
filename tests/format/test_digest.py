"""The one digest validator (lazyfs.format.digest): a table of strings every parser must agree on.

Every manifest, config, layout, trace, trust and referrers parser checks digests through
these functions, so this table is the grammar lazyfs accepts. A guarantee checked here
(break-tested by widening the sha256 pattern to ``[0-9a-fA-F]`` and to ``{64,}``: the
uppercase and overlong rows go red) is that nothing but lowercase, exact-length hex passes.
"""

from __future__ import annotations

import hashlib

import pytest

from lazyfs.errors import FormatError
from lazyfs.format.digest import (
    CHUNK_DIGEST_SIZE,
    chain_ids,
    check_chunk_digest,
    check_digest,
    check_sha256,
    digest_of,
    hasher_for,
    is_chunk_digest,
    is_sha256,
    sha256_digest,
    split_digest,
)

HEX64 = "0123456789abcdef" * 4
HEX128 = HEX64 * 2

# value, is_sha256, check_digest accepts (sha256 or sha512)
TABLE = [
    ("sha256:" + HEX64, True, True),
    ("sha512:" + HEX128, False, True),
    ("sha256:" + HEX64.upper(), False, False),  # uppercase hex: another string for the same bytes
    ("sha256:" + HEX64[:-1], False, False),  # 63 hex
    ("sha256:" + HEX64 + "0", False, False),  # 65 hex
    ("sha256:" + HEX64 + "\n", False, False),  # a trailing newline ($ would let it through)
    ("sha256:" + "g" * 64, False, False),
    ("sha256:", False, False),
    ("sha256", False, False),
    ("", False, False),
    (":" + HEX64, False, False),
    ("SHA256:" + HEX64, False, False),
    ("sha1:" + "a" * 40, False, False),
    ("sha512:" + HEX64, False, False),  # sha512 of sha256's length
    ("sha256:" + HEX128, False, False),  # sha256 of sha512's length
    (" sha256:" + HEX64, False, False),
    ("sha256-" + HEX64, False, False),  # a referrers tag, not a digest
    ("sha256:../" + HEX64[3:], False, False),
    (None, False, False),
    (5, False, False),
    (b"sha256:" + HEX64.encode(), False, False),
]


@pytest.mark.parametrize("value, sha256, oci", TABLE)
def test_digest_table(value, sha256, oci) -> None:
    assert is_sha256(value) is sha256
    if sha256:
        assert check_sha256(value, "x") == value
    else:
        with pytest.raises(FormatError, match=r"^x .* is not sha256:<64 hex>$"):
            check_sha256(value, "x")
    if oci:
        assert check_digest(value) == value
        assert hasher_for(value).name == value.partition(":")[0]
    else:
        with pytest.raises(FormatError):
            check_digest(value)


@pytest.mark.parametrize("value, parts", [
    ("sha256:" + HEX64, ("sha256", HEX64)),
    ("sha512:" + HEX128, ("sha512", HEX128)),
    ("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8", ("multihash+base58", "QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8")),
    ("sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564", ("sha256+b64u", "LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564")),
    ("sha256:../../etc/passwd", None),  # never a path outside the layout
    ("sha256:a/b", None),
    ("../sha256:ab", None),
    ("Sha256:ab", None),
    ("sha256:", None),
    (":ab", None),
    ("sha256:ab\n", None),
    (7, None),
])
def test_split_digest_follows_the_oci_grammar(value, parts) -> None:
    assert split_digest(value) == parts


@pytest.mark.parametrize("value, ok", [
    (bytes(CHUNK_DIGEST_SIZE), True),
    (bytes(CHUNK_DIGEST_SIZE - 1), False),
    (bytes(CHUNK_DIGEST_SIZE + 1), False),
    (bytearray(CHUNK_DIGEST_SIZE), False),  # msgpack bin decodes to bytes; anything else is not ours
    ("00" * CHUNK_DIGEST_SIZE, False),
    (None, False),
])
def test_chunk_digest_table(value, ok) -> None:
    assert is_chunk_digest(value) is ok
    if ok:
        assert check_chunk_digest(value) == value
    else:
        with pytest.raises(FormatError, match="^c: expected 32 bytes of blake3"):
            check_chunk_digest(value, "c")


def test_digests_of_bytes() -> None:
    assert sha256_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert digest_of(b"") == sha256_digest(b"")
    assert digest_of(b"", "sha512").startswith("sha512:cf83e1357eefb8bd")
    with pytest.raises(FormatError):
        digest_of(b"", "md5")


def test_chain_ids_follow_the_image_spec() -> None:
    a, b, c = (sha256_digest(bytes([n])) for n in range(3))
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids(iter([a])) == [a]
    assert chain_ids([]) == []
