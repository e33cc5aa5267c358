"""Attachment records (lazyfs.serve.state): round trips, one-line rejections, and version 1 state files.

Break-tested: dropping ``forbid_unknown_fields`` from FrontEnd turns the unknown-field rows red;
removing the version 1 ``extra`` -> ``front_end`` rename in AttachmentRecord.from_json turns
``test_version_1_state_file_still_loads`` red.
"""

from __future__ import annotations

import json

import pytest

from lazyfs.errors import FormatError
from lazyfs.serve.state import MAX_STATE_BYTES, AttachmentRecord, FrontEnd, LoadedState, decode_state, encode_state

# A state file exactly as the daemon wrote it before version 2 (Daemon._records with an "extra" dict).
VERSION_1 = {"attachments": [
    {"name": "img-0123456789", "image": "127.0.0.1:5000/app:v1", "writable_dir": None, "kind": None,
     "extra": {"target": "/mnt/app", "mode": "mount", "loop": "/dev/loop7", "loop_route": "buffered"}, "plain_http": []},
    {"name": "exp", "image": "oci:/srv/layout:v1", "writable_dir": "/var/lib/lazyfs/writable/exp", "kind": "log",
     "extra": {"target": "/srv/vm", "mode": "export"}, "plain_http": ["127.0.0.1:5000"]},
    {"name": "tcmu-disk0", "image": "oci:/srv/layout:v1", "writable_dir": None, "kind": None,
     "extra": {"tcmu": "disk0"}, "plain_http": []},
    {"name": "snap-3", "image": "oci:/var/lib/lazyfs/snapshotter/l:3", "writable_dir": None, "kind": None,
     "extra": {"owner": "snapshotter"}, "plain_http": []},
    {"name": "bare", "image": "oci:/srv/layout:v1", "writable_dir": None, "kind": None, "extra": {},
     "plain_http": []},
    # the last version 1 files also pinned the manifest and kept the hydrate policy
    {"name": "pinned", "image": "127.0.0.1:5000/app:v1", "writable_dir": None, "kind": None, "extra": {},
     "plain_http": [], "manifest": "sha256:" + "ab" * 32, "hydrate": {"deadline_at": 1600.5}},
    {"name": "unhydrated", "image": "127.0.0.1:5000/app:v1", "writable_dir": None, "kind": None, "extra": {},
     "plain_http": [], "manifest": "sha256:" + "cd" * 32, "hydrate": False},
]}


@pytest.mark.parametrize("front_end", [
    FrontEnd(),
    FrontEnd(mode="mount", target="/mnt/app", loop="/dev/loop12", loop_route="hydrated"),
    FrontEnd(mode="export", target="/srv/vm"),
    FrontEnd(tcmu="disk0"),
    FrontEnd(owner="snapshotter"),
])
def test_front_end_round_trip(front_end) -> None:
    doc = json.loads(json.dumps(front_end.to_json()))
    assert FrontEnd.from_json(doc) == front_end
    assert None not in doc.values()  # only what is set goes on the wire


@pytest.mark.parametrize("doc, message", [
    ({"mode": "mounted"}, "front_end: field mode: Invalid enum value 'mounted'"),
    ({"target": "relative/dir"}, "front_end: field target: Expected `str` matching regex '^/'"),
    ({"target": 5}, "front_end: field target: Expected `str | null`, got `int`"),
    ({"loop": "/dev/sda"}, "front_end: field loop: Expected `str` matching regex"),
    ({"loop": "/dev/loop1; rm -rf /"}, "front_end: field loop: Expected `str` matching regex"),
    ({"tcmu": "../../kernel"}, "front_end: field tcmu: Expected `str` matching regex"),
    ({"loop_route": "fast"}, "front_end: field loop_route: Invalid enum value 'fast'"),
    ({"owner": "someone"}, "front_end: field owner: Invalid enum value 'someone'"),
    ({"target": "/mnt", "mountpoint": "/mnt"}, "front_end: Object contains unknown field `mountpoint`"),
    ([], "front_end: Expected `object`, got `array`"),
    ("mount", "front_end: Expected `object`, got `str`"),
])
def test_front_end_rejects_bad_fields_in_one_line(doc, message) -> None:
    with pytest.raises(FormatError) as bad:
        FrontEnd.from_json(doc)
    assert str(bad.value).startswith(message) and "\n" not in str(bad.value)


def test_update_replaces_only_what_is_set() -> None:
    mounted = FrontEnd(mode="mount", target="/mnt/app")
    assert mounted.updated(FrontEnd(loop="/dev/loop3")) == FrontEnd(mode="mount", target="/mnt/app", loop="/dev/loop3")
    assert mounted.updated(FrontEnd()) == mounted


@pytest.mark.parametrize("doc, message", [
    ({"image": "x"}, "attachment record: Object missing required field `name`"),
    ({"name": "../etc", "image": "x"}, "attachment record: field name: Expected `str` matching regex"),
    ({"name": "a", "image": ""}, "attachment record: field image: Expected `str` of length >= 1"),
    ({"name": "a", "image": "x", "writable_dir": "rel"}, "attachment record: field writable_dir: Expected `str` matching"),
    ({"name": "a", "image": "x", "plain_http": "host"}, "attachment record: field plain_http: Expected `array`"),
    ({"name": "a", "image": "x", "front_end": {"loop": 7}}, "attachment record: field front_end.loop: Expected `str | null`"),
    ({"name": "a", "image": "x", "extra": {"bogus": 1}}, "attachment record: field front_end: Object contains unknown field"),
    ({"name": "a", "image": "x", "size": 1}, "attachment record: Object contains unknown field `size`"),
    ({"name": "a", "image": "x", "manifest": "sha256:AB"}, "attachment record: manifest 'sha256:AB' is not sha256:<64 hex>"),
    ({"name": "a", "image": "x", "hydrate": "yes"}, "attachment record: field hydrate: Expected `bool | object | null`"),
])
def test_attachment_record_rejects_bad_fields_in_one_line(doc, message) -> None:
    with pytest.raises(FormatError) as bad:
        AttachmentRecord.from_json(doc)
    assert str(bad.value).startswith(message) and "\n" not in str(bad.value)


def test_version_1_state_file_still_loads() -> None:
    loaded = decode_state(json.dumps(VERSION_1, indent=1).encode())
    records = loaded.records
    assert loaded.skipped == ()
    assert [(r.name, r.front_end) for r in records] == [
        ("img-0123456789", FrontEnd(mode="mount", target="/mnt/app", loop="/dev/loop7", loop_route="buffered")),
        ("exp", FrontEnd(mode="export", target="/srv/vm")),
        ("tcmu-disk0", FrontEnd(tcmu="disk0")),
        ("snap-3", FrontEnd(owner="snapshotter")),
        ("bare", FrontEnd()),
        ("pinned", FrontEnd()),
        ("unhydrated", FrontEnd()),
    ]
    assert (records[5].manifest, records[5].hydrate) == ("sha256:" + "ab" * 32, {"deadline_at": 1600.5})
    assert (records[6].hydrate, records[0].manifest, records[0].hydrate) == (False, None, None)
    assert records[1].writable_dir == "/var/lib/lazyfs/writable/exp" and records[1].kind == "log"
    assert records[1].plain_http == ("127.0.0.1:5000",)
    # written back as version 2, it reads the same
    assert decode_state(encode_state(records)).records == records
    assert json.loads(encode_state(records))["version"] == 2


def test_one_bad_record_skips_only_itself() -> None:
    doc = {"version": 2, "attachments": [
        {"name": "good", "image": "x"},
        {"name": "bad", "image": "x", "front_end": {"loop": "/dev/sda"}},
        {"name": "good", "image": "y"},
        "not an object",
        {"name": "also-good", "image": "z", "front_end": {"tcmu": "d"}},
    ]}
    loaded = decode_state(json.dumps(doc).encode(), "state")
    assert [r.name for r in loaded.records] == ["good", "also-good"]
    assert loaded.skipped == (
        "state: attachments[1]: field front_end.loop: Expected `str` matching regex '^/dev/loop[0-9]{1,7}$'",
        "state: attachments[2]: a second record for 'good'",
        "state: attachments[3]: Expected `object`, got `str`",
    )


@pytest.mark.parametrize("data, message", [
    (b"{", "state: not JSON"),
    (b"[]", "state: not an object with a list of attachments"),
    (b'{"attachments": {}}', "state: not an object with a list of attachments"),
    (b'{"version": 3, "attachments": []}', "state: version 3 is not one this lazyfs reads"),
    (b"[" * 100_000, "state: not JSON"),
    (b" " * (MAX_STATE_BYTES + 1), f"state: {MAX_STATE_BYTES + 1} bytes, more than"),
])
def test_a_file_that_is_not_a_state_file_is_one_error(data, message) -> None:
    with pytest.raises(FormatError) as bad:
        decode_state(data, "state")
    assert str(bad.value).startswith(message) and "\n" not in str(bad.value)


def test_empty_state_file() -> None:
    assert decode_state(b'{"attachments": []}') == LoadedState((), ())
    assert decode_state(encode_state([])) == LoadedState((), ())


def test_inode_numbers_round_trip_and_bad_ones_are_dropped():
    """The FUSE inode numbers a takeover needs survive the state file; a wrong one never reaches ExportFS."""
    from lazyfs.serve.state import AttachmentRecord, decode_state, encode_state

    rec = AttachmentRecord(name="a", image="r/x:1", inode=6)
    loaded = decode_state(encode_state([rec], next_inode=8))
    assert loaded.records[0].inode == 6 and loaded.next_inode == 8
    assert decode_state(b'{"version": 2, "attachments": [], "next_inode": "8"}').next_inode is None
    bad = decode_state(b'{"version": 2, "attachments": [{"name": "a", "image": "r", "inode": 1}]}')
    assert bad.records == () and "inode" in bad.skipped[0]
