"""containerd's filter language, as Walk uses it (pure: no snapshotter, no I/O)."""

import pytest

from lazyfs.errors import ConfigError
from lazyfs.serve.snapshotter.filters import Selector, parse_filters, snapshot_fields

# the snapshots of containerd's Walk conformance test: name -> (parent, kind, labels)
ROOT = {"containerd.io/gc.root": "check-walk"}
SNAPSHOTS = {
    "a-np": ("", "active", ROOT),
    "p": ("", "committed", ROOT),
    "a": ("p", "active", ROOT),
    "v": ("p", "view", ROOT),
    "p-wl": ("", "committed", {**ROOT, "l": "1"}),
    "a-wl": ("p-wl", "active", {**ROOT, "l": "2"}),
    "v-wl": ("p-wl", "view", {**ROOT, "l": "3"}),
    "a-np-wl": ("", "active", {**ROOT, "l": "2"}),
    "unlabelled": ("", "active", {}),
}


def matching(*filters):
    f = parse_filters(list(filters))
    return sorted(n for n, (parent, kind, labels) in SNAPSHOTS.items()
                  if f.matches(snapshot_fields(n, parent, kind, labels)))


@pytest.mark.parametrize("filters, expected", [
    (['labels."containerd.io/gc.root"==check-walk'], ["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"]),
    (['kind==active,labels."containerd.io/gc.root"==check-walk'], ["a", "a-np", "a-np-wl", "a-wl"]),
    (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
    (["name==p", "name==a-np-wl"], ["a-np-wl", "p"]),
    (["name==a-wl,labels.l"], ["a-wl"]),
    (["parent==p"], ["a", "v"]),
    (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "a-wl", "v", "v-wl"]),
    (["labels.l"], ["a-np-wl", "a-wl", "p-wl", "v-wl"]),
    (["labels.l==2"], ["a-np-wl", "a-wl"]),
    (["labels.l!=2"], ["a", "a-np", "p", "p-wl", "unlabelled", "v", "v-wl"]),  # absent counts as ""
    (["name~=^a-"], ["a-np", "a-np-wl", "a-wl"]),
    (["name~=/-wl$/"], ["a-np-wl", "a-wl", "p-wl", "v-wl"]),
    ([" kind == committed , labels.l == 1 "], ["p-wl"]),
    ([], sorted(SNAPSHOTS)),
    ([""], sorted(SNAPSHOTS)),
])
def test_walk_filters_of_the_conformance_suite(filters, expected):
    assert matching(*filters) == expected


def test_the_filter_containerd_uses_to_find_a_remote_snapshot():
    target = "sha256:" + "ab" * 32
    f = parse_filters([f'labels."containerd.io/snapshot.ref"=={target},parent==""'])
    assert f.alternatives == ((Selector(("labels", "containerd.io/snapshot.ref"), "==", target),
                               Selector(("parent",), "==", "")),)
    assert f.matches(snapshot_fields(target, "", "committed", {"containerd.io/snapshot.ref": target}))
    assert not f.matches(snapshot_fields(target, "other", "committed", {"containerd.io/snapshot.ref": target}))


def test_quoted_strings_use_go_escapes():
    f = parse_filters([r'labels."a\"b"=="tab\there\x41\u00e9\101"'])
    (sel,), = f.alternatives
    assert sel.fieldpath == ("labels", 'a"b') and sel.value == "tab\thereAéA"


@pytest.mark.parametrize("text", ["name==", "==x", "name=x", "name==a,", 'name=="open', "name~=(", "name==a b",
                                  "name==/x/", '"a\\q"==b', ".name"])
def test_malformed_filters_are_rejected(text):
    with pytest.raises(ConfigError, match="filter"):
        parse_filters([text])
