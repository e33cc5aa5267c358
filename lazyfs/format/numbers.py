"""Numbers in text from the wire (annotations, pax headers), parsed strictly. Sans-IO.

``int()`` and ``float()`` accept far more than these formats allow: surrounding
spaces, underscores, any Unicode digit ("٣" is 3), exponents, "Infinity" and
"nan". ``str.isdigit()`` is no guard either: "²".isdigit() is true but
``int("²")`` fails. Here a number is ASCII digits, within stated bounds.
"""

from __future__ import annotations

import re

from lazyfs.errors import FormatError

_DECIMAL = re.compile(r"[0-9]{1,20}")
_PAX_TIME = re.compile(r"(-?)([0-9]{1,20})(?:\.([0-9]{1,30}))?")
NS = 1_000_000_000


def decimal(text: object, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    """An unsigned ASCII decimal in ``[lo, hi]``, or FormatError naming *what*."""
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise FormatError(f"{what}: {text!r} is not a decimal number")
    value = int(text)
    if not lo <= value <= hi:
        raise FormatError(f"{what}: {value} is outside [{lo}, {hi}]")
    return value


def pax_time_ns(text: str, what: str, limit_s: int = 1 << 40) -> int:
    """A pax time (``[-]seconds[.fraction]``) in nanoseconds, |seconds| at most *limit_s*.

    Digits past nanoseconds are dropped (truncated toward zero), as tar does.
    """
    m = _PAX_TIME.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise FormatError(f"{what}: {text!r} is not a pax time (seconds[.fraction])")
    sign, seconds, fraction = m.group(1), int(m.group(2)), (m.group(3) or "")
    if seconds > limit_s:
        raise FormatError(f"{what}: {text} seconds is out of range")
    ns = seconds * NS + int((fraction + "000000000")[:9])
    return -ns if sign else ns
