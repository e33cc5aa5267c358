"""Attachment records: what is attached and what front ends made of it, as typed values. Sans-IO.

Two documents carry them:

* the control API: ``attach`` and ``mark`` take a ``front_end`` object
  (:class:`FrontEnd`), and ``list`` shows its fields beside the attachment's;
* the daemon's state file (``Config.state_file``), which a restarted daemon
  attaches again from and ``lazyfs umount`` reads when the daemon is gone:
  ``{"version": 2, "attachments": [AttachmentRecord, ...]}``.

Both are decoded by msgspec into frozen structs that reject an unknown field or a
value of the wrong shape with one line naming the field. State files written
before version 2 (an untyped ``extra`` object per attachment) still load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from lazyfs.errors import FormatError
from lazyfs.format.digest import is_sha256

__all__ = [
    "ATTACHMENT_NAME",
    "IMAGE_NAME",
    "MAX_STATE_BYTES",
    "STATE_VERSION",
    "TCMU_NAME",
    "AttachmentRecord",
    "FrontEnd",
    "LoadedState",
    "attachment_name",
    "is_attachment_name",
    "decode_state",
    "encode_state",
]

STATE_VERSION = 2
MAX_STATE_BYTES = 16 << 20  # thousands of attachments; a larger file is not one lazyfs wrote
# Attachment names are file names (under the export directory) and TCMU names are configfs
# directory names: both are checked by these patterns, here and where they are used.
ATTACHMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
TCMU_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DM_NAME = r"lazyfs-[0-9a-f]{16}"  # a switchable device's device-mapper name (serve/dmswitch.py)
_NAME = re.compile(ATTACHMENT_NAME)
IMAGE_NAME = "disk.img"
"""The name of the exported file inside each export directory (both FUSE front ends)."""


def is_attachment_name(name: str) -> bool:
    """Whether *name* may name an attachment (a file name under the export directory)."""
    return _NAME.match(name) is not None


def attachment_name(text: str) -> str:
    """A file-name-safe attachment name derived from an image reference."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text.split("@")[0]).strip("-.")[-100:] or "image"
    return name if is_attachment_name(name) else "image-" + name[-90:]


_AbsolutePath = Annotated[str, msgspec.Meta(pattern=r"^/", max_length=4096)]
_LoopDevice = Annotated[str, msgspec.Meta(pattern=r"^/dev/loop[0-9]{1,7}$")]


class FrontEnd(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a front end made of an attachment, so that ``umount`` and a restarted daemon can find it.

    Every field is optional: ``lazyfs mount`` sets ``mode="mount"``, ``target`` and
    (once the loop device exists) ``loop``, ``loop_route`` and, where the mount is switchable, ``dm``;
    ``lazyfs export`` sets ``mode="export"``
    and ``target``; a TCMU LUN sets ``tcmu``; the containerd snapshotter sets ``owner``.
    """

    mode: Literal["mount", "export"] | None = None
    target: _AbsolutePath | None = None  # the mount point, or the directory holding the disk.img link
    loop: _LoopDevice | None = None  # the loop device over the exported image file
    loop_route: Literal["direct", "buffered", "hydrated"] | None = None  # how the loop reads (serve/warmloop.py)
    dm: Annotated[str, msgspec.Meta(pattern=f"^{DM_NAME}$")] | None = None  # the switchable device over the loop (serve/dmswitch.py)
    tcmu: Annotated[str, msgspec.Meta(pattern=TCMU_NAME)] | None = None  # the TCMU device name
    tcmu_block_size: Literal[512, 1024, 2048, 4096] | None = None  # its logical block size
    owner: Literal["snapshotter"] | None = None  # who attached it, when not a user

    @classmethod
    def from_json(cls, doc: object, what: str = "front_end") -> FrontEnd:
        """The FrontEnd of a decoded JSON object; FormatError naming *what* and the field."""
        return _convert(doc, cls, what)

    def to_json(self) -> dict:
        """The fields that are set, as a JSON object."""
        return msgspec.to_builtins(self)

    def updated(self, changes: FrontEnd) -> FrontEnd:
        """This record with the fields *changes* sets replaced."""
        return msgspec.structs.replace(self, **changes.to_json())


class AttachmentRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One attachment as the state file keeps it: enough to attach it again after a restart."""

    name: Annotated[str, msgspec.Meta(pattern=ATTACHMENT_NAME)]
    image: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    writable_dir: _AbsolutePath | None = None  # None: attached read-only
    kind: str | None = None  # the writable layer's kind (checked when it is opened)
    plain_http: tuple[Annotated[str, msgspec.Meta(min_length=1)], ...] = ()
    front_end: FrontEnd = FrontEnd()
    # the trust anchor of a restore: exactly this manifest, from the metadata cache if the
    # registry is away (docs/format.md §7, docs/daemon.md "Offline life"); None in older files
    manifest: str | None = None
    # False: none; True: the default rate; else HydratePolicy.to_json() (checked when it is applied)
    hydrate: bool | dict[str, int | float] | None = None
    # the export's directory inode on the FUSE connection (its disk.img is the next one): a daemon
    # taking the connection over gives it the same numbers (docs/daemon.md "Live restart")
    inode: Annotated[int, msgspec.Meta(ge=2, lt=1 << 39)] | None = None
    # the backing file id the export's opens are passed through to on that connection (0: none);
    # a daemon taking the connection over answers opens with it too (docs/warm.md §3)
    backing_id: Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)] = 0

    def __post_init__(self) -> None:
        if self.manifest is not None and not is_sha256(self.manifest):
            raise ValueError(f"manifest {self.manifest!r} is not sha256:<64 hex>")

    @classmethod
    def from_json(cls, doc: object, what: str = "attachment record") -> AttachmentRecord:
        """The record of a decoded JSON object (either state file version); FormatError naming the field."""
        if isinstance(doc, dict) and "extra" in doc and "front_end" not in doc:
            doc = {**doc, "front_end": doc["extra"] or {}}  # version 1 named it "extra"
            del doc["extra"]
        return _convert(doc, cls, what)

    def to_json(self) -> dict:
        return msgspec.to_builtins(self)


def encode_state(records: list[AttachmentRecord] | tuple[AttachmentRecord, ...], next_inode: int | None = None,
                 handle_generation: int | None = None) -> bytes:
    """The state file's bytes for *records* (and the FUSE export's next free inode number and
    the generation of the file handles it gives out)."""
    doc = {"version": STATE_VERSION, "attachments": [r.to_json() for r in records]}
    if next_inode is not None:
        doc["next_inode"] = next_inode
    if handle_generation is not None:
        doc["handle_generation"] = handle_generation
    return json.dumps(doc, indent=1).encode()


@dataclass(frozen=True, slots=True)
class LoadedState:
    """A decoded state file: the records to restore, and one line per record that was skipped."""

    records: tuple[AttachmentRecord, ...]
    skipped: tuple[str, ...]
    next_inode: int | None = None  # never reuse an inode number a kept FUSE connection may know
    handle_generation: int = 0  # never reuse a file handle id a kept FUSE connection may hold


def decode_state(data: bytes, what: str = "state file") -> LoadedState:
    """The records of a state file (version 1 or 2), and one line per record that was skipped.

    FormatError if the file as a whole is not a state file; a bad record only skips that
    record, so one damaged entry never loses the others.
    """
    if len(data) > MAX_STATE_BYTES:
        raise FormatError(f"{what}: {len(data)} bytes, more than {MAX_STATE_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("attachments", []), list):
        raise FormatError(f"{what}: not an object with a list of attachments")
    version = doc.get("version", 1)
    if version not in (1, STATE_VERSION):
        raise FormatError(f"{what}: version {version!r} is not one this lazyfs reads (1 or {STATE_VERSION})")
    records: list[AttachmentRecord] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(doc.get("attachments", [])):
        try:
            record = AttachmentRecord.from_json(entry, f"{what}: attachments[{i}]")
        except FormatError as exc:
            skipped.append(str(exc))
            continue
        if record.name in seen:
            skipped.append(f"{what}: attachments[{i}]: a second record for {record.name!r}")
            continue
        seen.add(record.name)
        records.append(record)
    next_inode = doc.get("next_inode")
    if not (isinstance(next_inode, int) and not isinstance(next_inode, bool) and 2 <= next_inode < 1 << 39):
        next_inode = None
    generation = doc.get("handle_generation")
    if not (isinstance(generation, int) and not isinstance(generation, bool) and generation >= 0):
        generation = 0
    return LoadedState(tuple(records), tuple(skipped), next_inode, generation)


def _convert(doc: object, cls: type, what: str):
    try:
        return msgspec.convert(doc, cls)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).rpartition(" - at `")
        if not message:
            return _raise(what, str(exc))
        return _raise(f"{what}: field {path.rstrip('`').removeprefix('$').removeprefix('.')}", message)


def _raise(what: str, message: str):
    raise FormatError(f"{what}: {message}")
