"""Reading registry answers: bounded bodies, error mapping, headers (no requests are made here)."""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Callable

import httpx

from lazyfs.errors import AuthError, FetchError, FormatError, IntegrityError, NotFoundError, describe
from lazyfs.fetch.registry.retry import Transient, parse_retry_after
from lazyfs.fetch.registry.transport import BodyTooLarge

MAX_ERROR_BODY = 64 << 10
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


async def read_body(response: httpx.Response, limit: int, what: str,
                    received: Callable[[int], None] = lambda n: None) -> bytes:
    """The whole body, refusing more than *limit* bytes (FetchError) before or while reading;
    a cut or stalled body is Transient. *received* is told each piece's size."""
    declared = response.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise FetchError(f"{what}: bad Content-Length {declared!r}", response.status_code)
        if int(declared) > limit:
            raise FetchError(f"{what}: {declared} bytes, more than the {limit} expected", response.status_code)
    parts: list[bytes] = []
    total = 0
    try:
        async for piece in response.aiter_bytes():
            total += len(piece)
            received(len(piece))
            if total > limit:
                raise FetchError(f"{what}: more than the {limit} bytes expected", response.status_code)
            parts.append(piece)
    except httpx.TimeoutException:
        raise Transient(f"{what}: timed out reading the body") from None
    except (httpx.TransportError, httpx.DecodingError) as e:
        raise Transient(f"{what}: body cut short: {type(e).__name__}: {describe(e)}") from None
    except BodyTooLarge as e:
        raise FetchError(f"{what}: {e}", response.status_code) from None
    return b"".join(parts)


def error_detail(body: bytes) -> tuple[str, str]:
    """(code, message) of an OCI error body ``{"errors":[{"code","message"}]}``, best effort."""
    try:
        first = json.loads(body)["errors"][0]
        return str(first.get("code", "")), str(first.get("message", ""))
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return "", body[:200].decode("utf-8", "replace").strip()  # an HTML page, an empty body: no detail


async def fail(response: httpx.Response, what: str) -> None:
    """Raise the error an unexpected answer stands for (the caller closes *response*)."""
    status = response.status_code
    try:
        body = await read_body(response, MAX_ERROR_BODY, what)
    except (FetchError, Transient):
        body = b""
    code, message = error_detail(body)
    detail = f" ({code}: {message})" if code else (f" ({message})" if message else "")
    if status == 404:
        raise NotFoundError(f"{what}: not found{detail}")
    if status in (401, 403):
        raise AuthError(f"{what}: access denied, HTTP {status}{detail}", status)
    if status == 429 or (status >= 500 and status not in (501, 505)):
        raise Transient(f"HTTP {status}{detail}", status, parse_retry_after(response.headers.get("retry-after")))
    if code == "DIGEST_INVALID":
        raise IntegrityError(what, "the digest we sent", f"registry says: {message or 'DIGEST_INVALID'}")
    raise FetchError(f"{what}: unexpected HTTP {status}{detail}", status)


def tls_failure(exc: BaseException) -> str | None:
    """A certificate problem hidden in *exc*'s cause chain (ours or the server's verdict on
    our client certificate), as a sentence; None if that is not what failed."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({e.verify_message or e}); " \
                   "give this registry a ca_file that signs its certificate"
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return f"TLS certificate verification failed ({text}); give this registry a ca_file that signs its certificate"
        if "CERTIFICATE_REQUIRED" in text or "BAD_CERTIFICATE" in text or "UNKNOWN_CA" in text:
            return f"the server refused our TLS client certificate ({text}); configure client_cert and client_key"
        e = e.__cause__ or e.__context__
    return None


def check_content_range(header: str | None, first: int, last: int, where: str) -> None:
    if header is None:
        return  # the body length check still applies
    m = _CONTENT_RANGE.match(header.strip())
    if m is None:
        raise FetchError(f"{where}: malformed Content-Range {header!r}", 206)
    a, b, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if total != "*" and last >= int(total):
        raise FetchError(f"{where}: range beyond the end of the blob ({total} bytes)", 206)
    if (a, b) != (first, last):
        raise FetchError(f"{where}: server sent bytes {a}-{b} instead", 206)


def media_type(content_type: str, data: bytes, what: str) -> str:
    """The manifest's media type: its Content-Type, else the ``mediaType`` it names."""
    media = content_type.split(";")[0].strip()
    if media and media not in ("application/json", "text/plain", "application/octet-stream"):
        return media
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what}: neither a manifest Content-Type nor JSON") from None
    named = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(named, str) and named:
        return named
    if media:
        return media
    raise FormatError(f"{what}: no media type in the answer or the manifest")


def parse_tags(body: bytes, what: str) -> list[str]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FetchError(f"{what}: answer is not JSON") from None
    tags = doc.get("tags") if isinstance(doc, dict) else None
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise FetchError(f"{what}: 'tags' is not a list of strings")
    return tags


def next_page(response: httpx.Response, what: str) -> httpx.URL | None:
    """The ``Link: <…>; rel="next"`` URL of a paginated answer, if any."""
    link = _LINK_NEXT.search(response.headers.get("link", ""))
    if link is None:
        return None
    try:
        return response.url.join(link.group(1))
    except httpx.InvalidURL as e:
        raise FetchError(f"{what}: bad Link header: {e}") from None


def location(response: httpx.Response, what: str) -> httpx.URL:
    """The absolute ``Location`` of an answer (FetchError if missing or malformed)."""
    value = response.headers.get("location")
    if not value:
        status = response.status_code
        raise FetchError(f"{what}: registry answered HTTP {status} without a Location", status)
    try:
        return response.url.join(value)
    except httpx.InvalidURL as e:
        raise FetchError(f"{what}: bad Location {value!r}: {e}") from None
