"""The one exception hierarchy of lazyfs, and its single mapping to errno."""

from __future__ import annotations

import errno


class LazyfsError(Exception):
    """Root of every error lazyfs raises on purpose."""

    errno: int = errno.EIO


class FormatError(LazyfsError):
    """Malformed input: a blob, manifest, journal, tar or CDB that does not parse.

    The message says what is wrong and where (file, offset, field).
    """


class IntegrityError(LazyfsError):
    """Bytes whose digest is not the one expected."""

    def __init__(self, what: str, expected: str, got: str, source: str = "") -> None:
        self.what, self.expected, self.got, self.source = what, expected, got, source
        where = f" from {source}" if source else ""
        super().__init__(f"digest mismatch for {what}{where}: expected {expected}, got {got}")


class FetchError(LazyfsError):
    """A remote read failed (HTTP status, connection error, deadline)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class AuthError(FetchError):
    """The registry refused our credentials."""

    errno = errno.EACCES


class NotFoundError(LazyfsError):
    """An image, tag, blob or path that does not exist."""

    errno = errno.ENOENT


class ConfigError(LazyfsError):
    """Invalid configuration or command-line usage; the message names the field."""

    errno = errno.EINVAL


class RangeError(LazyfsError):
    """An offset or length outside a block source."""

    errno = errno.EINVAL


class ReadOnlyError(LazyfsError):
    """A write to a read-only source."""

    errno = errno.EROFS


class BusyError(LazyfsError):
    """The resource is in use (already mounted, attached, locked)."""

    errno = errno.EBUSY


class AlreadyExistsError(LazyfsError):
    """A name that must be new is taken (a snapshot key, an image tag)."""

    errno = errno.EEXIST


class TrustError(LazyfsError):
    """An artifact this host's trust policy refuses: not made here, unsigned, or signed by no trusted key.

    The message says which artifact and why (docs/trust.md).
    """

    errno = errno.EACCES


class StorageError(LazyfsError):
    """Local storage refused a write or a sync: disk full (ENOSPC), an I/O error (EIO), ...

    ``errno`` is the one the kernel reported, so a full writable root reaches a
    FUSE or SCSI client as ENOSPC and a failing disk as EIO.
    """

    def __init__(self, message: str, errno_: int = errno.EIO) -> None:
        self.errno = errno_
        super().__init__(message)


class ManyErrors(LazyfsError):
    """Several different errors at once (concurrent tasks); says the first and counts the rest.

    ``errors`` holds them all; the errno is the first one's.
    """

    def __init__(self, errors: list[BaseException] | tuple[BaseException, ...]) -> None:
        self.errors = tuple(errors)
        self.errno = to_errno(self.errors[0])
        rest = len(self.errors) - 1
        super().__init__(f"{describe(self.errors[0])} (and {rest} more error{'s' if rest > 1 else ''}: "
                         + "; ".join(describe(e) for e in self.errors[1:3]) + ("; ..." if rest > 2 else "") + ")")


def describe(exc: BaseException) -> str:
    """*exc* as text that always says something: its message, else the first message in its
    cause chain (``[SSL: WRONG_VERSION_NUMBER] wrong version number``), else its type name.

    Some exceptions (httpx's, trio's BrokenResourceError) have an empty ``str()``; a message
    built as ``f"...: {exc}"`` then ends in nothing. Format causes with this instead.
    """
    text = str(exc).strip()
    if text:
        return text
    seen = {id(exc)}
    # __context__ too, even where suppressed: httpcore raises its errors "from None" over the real one
    inner = exc.__cause__ or exc.__context__
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        text = str(inner).strip()
        if text:
            return text
        inner = inner.__cause__ or inner.__context__
    return type(exc).__name__


def one_line(exc: BaseException) -> str:
    """What a command prints after ``lazyfs: error:``: one line, always with a cause.

    A LazyfsError is its message; an OSError its strerror and file name; anything else is a
    bug and says so (``--debug`` shows its traceback).
    """
    if isinstance(exc, LazyfsError):
        text = describe(exc)
    elif isinstance(exc, OSError):
        text = (exc.strerror or describe(exc)) + (f": {exc.filename}" if exc.filename else "")
    else:
        message = str(exc).strip()
        text = f"internal error: {type(exc).__name__}{': ' + message if message else ''} (run with --debug for the traceback)"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE handler returns for *exc* (EIO for anything unexpected)."""
    if isinstance(exc, LazyfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
