"""decode_counted_map: the one counted msgpack map reader behind layer metadata and traces.

Break-tested: removing the bytes-left check in ``_read_table`` turns the ``claims`` row red
(the count is then only refused after msgpack runs out of data, as a different error).
"""

from __future__ import annotations

import msgpack
import pytest

from lazyfs.errors import FormatError
from lazyfs.format.counted import Table, decode_counted_map

TABLES = {"names": Table(max_rows=3), "rows": Table(width=2, min_bytes=3, cost=10)}


def decode(doc_bytes: bytes, charged: list | None = None) -> dict:
    return decode_counted_map(doc_bytes, "thing", max_keys=4, scalars=("v",), tables=TABLES, max_str_len=16,
                              max_bin_len=8, charge=None if charged is None else lambda n, what: charged.append(n))


def pack(doc) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def test_scalars_and_tables_come_back_unknown_keys_are_skipped() -> None:
    charged: list[int] = []
    doc = decode(pack({"v": 1, "names": ["a", "b"], "rows": [[1, 2], [3, 4]], "other": {"x": [1] * 50}}), charged)
    assert doc == {"v": 1, "names": ["a", "b"], "rows": [(1, 2), (3, 4)]}
    assert charged == [20]  # rows' cost, charged before they were read; names cost nothing


@pytest.mark.parametrize("data, message", [
    (pack({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}), "thing: a map of 5 keys (at most 4)"),
    (b"\x82\xa1v\x01\xa1v\x02", "thing: key 'v' is not a string or appears twice"),
    (pack({1: 2}), "thing: key 1 is not a string or appears twice"),
    (pack({"names": ["a", "b", "c", "d"]}), "thing: 4 names (at most 3)"),
    (b"\x81\xa4rows\xdd\x00\x01\x00\x00", "thing: rows claims 65536 entries, more than its 0 remaining bytes can hold"),
    (pack({"rows": [[1, 2, 3]]}), "thing: rows[0] is not an array of 2"),
    (pack({"v": 1}) + b"\x00", "thing: 1 bytes after its map"),
    (pack({"v": "x" * 17}), "thing does not decode"),
    (pack({"v": b"x" * 9}), "thing does not decode"),
    (pack([1, 2]), "thing does not decode"),
    (b"", "thing does not decode"),
])
def test_malformed_maps_are_one_format_error(data, message) -> None:
    with pytest.raises(FormatError) as bad:
        decode(data)
    assert str(bad.value).startswith(message)
