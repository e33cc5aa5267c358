"""Counted msgpack maps: decode a map of scalars and tables without building anything uncounted. Sans-IO.

The layer metadata (docs/format.md §4) and startup traces are msgpack maps whose
values are scalars or tables (arrays of rows). msgpack's own limits do not cover
containers read header by header, so :func:`decode_counted_map` reads every
container header first and checks its count against the caller's bounds (and
against the bytes left, so a count the data cannot hold is refused before any
row is built) before it reads a single element.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import msgpack

from lazyfs.errors import FormatError

__all__ = ["Table", "decode_counted_map"]

_ERRORS = (ValueError, TypeError, msgpack.exceptions.UnpackException)


@dataclass(frozen=True, slots=True)
class Table:
    """How one array value of the map is read.

    ``width`` None: each row is one scalar (a list of scalars comes back);
    else each row must be an array of exactly ``width`` scalars (tuples come back).
    ``max_rows`` None: bounded only by the bytes left, at ``min_bytes`` per row.
    ``cost``: bytes of memory a row costs, charged before the rows are read.
    """

    max_rows: int | None = None
    width: int | None = None
    min_bytes: int = 1
    cost: int = 0


def decode_counted_map(data: bytes, what: str, *, max_keys: int, scalars: Collection[str],
                       tables: Mapping[str, Table], max_str_len: int, max_bin_len: int,
                       charge: Callable[[int, str], None] | None = None) -> dict:
    """The map in *data*: *scalars* and *tables* by key; other keys are skipped unread.

    FormatError naming *what* for anything malformed: not one map filling *data*, more
    than *max_keys* keys, a key that is not a string or appears twice, a table over its
    bounds or with a row of the wrong width, a string or binary longer than the limits.
    *charge* (e.g. a metadata budget) is called with each table's cost before it is read.
    """
    end = len(data)
    # Scalars only: containers are walked header by header (read_*_header ignores these limits).
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(1, end), max_str_len=max_str_len,
                                max_bin_len=max_bin_len, max_array_len=0, max_map_len=0, max_ext_len=0)
    unpacker.feed(data)
    doc: dict = {}
    try:
        keys = unpacker.read_map_header()
        if keys > max_keys:
            raise FormatError(f"{what}: a map of {keys} keys (at most {max_keys})")
        for _ in range(keys):
            key = unpacker.unpack()
            if not isinstance(key, str) or key in doc:
                raise FormatError(f"{what}: key {key!r} is not a string or appears twice")
            table = tables.get(key)
            if table is not None:
                doc[key] = _read_table(unpacker, end, key, table, what, charge)
            elif key in scalars:
                doc[key] = unpacker.unpack()
            else:
                unpacker.skip()
        if unpacker.tell() != end:
            raise FormatError(f"{what}: {end - unpacker.tell()} bytes after its map")
    except FormatError:
        raise
    except _ERRORS as exc:
        raise FormatError(f"{what} does not decode: {exc or type(exc).__name__}") from None
    return doc


def _read_table(unpacker: msgpack.Unpacker, end: int, key: str, table: Table, what: str,
                charge: Callable[[int, str], None] | None) -> list:
    n = unpacker.read_array_header()
    if table.max_rows is not None and n > table.max_rows:
        raise FormatError(f"{what}: {n} {key} (at most {table.max_rows})")
    if n * table.min_bytes > end - unpacker.tell():
        raise FormatError(f"{what}: {key} claims {n} entries, more than its "
                          f"{end - unpacker.tell()} remaining bytes can hold")
    if charge is not None and table.cost:
        charge(n * table.cost, what)
    if table.width is None:
        return [unpacker.unpack() for _ in range(n)]
    rows = []
    for i in range(n):
        if unpacker.read_array_header() != table.width:
            raise FormatError(f"{what}: {key}[{i}] is not an array of {table.width}")
        rows.append(tuple(unpacker.unpack() for _ in range(table.width)))
    return rows
