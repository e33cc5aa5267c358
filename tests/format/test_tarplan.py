"""The tar layer planner (sans-IO): names, whiteouts, parent resolution through symlinks, sizing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.errors import FormatError
from lazyfs.format.tarplan import (
    MIB,
    Done,
    FsUsage,
    Kind,
    LayerStats,
    Lookup,
    Opaque,
    Put,
    Restart,
    TarEntry,
    Up,
    UpperPaths,
    Walk,
    Whiteout,
    next_fs_size,
    plan_entry,
    split_name,
)


@pytest.mark.parametrize("name, expected", [
    ("./etc/passwd", ("etc", "passwd")),
    ("etc//passwd/", ("etc", "passwd")),
    (".", ()),
    ("./", ()),
    ("a/b/../c", ("a", "c")),
    ("a/./b", ("a", "b")),
    ("ünï/\udcff", ("ünï", "\udcff")),
])
def test_split_name(name, expected):
    assert split_name(name) == expected


@pytest.mark.parametrize("name, why", [
    ("../etc/passwd", "climbs out"),
    ("a/../../etc", "climbs out"),
    ("./..", "climbs out"),
    ("/etc/passwd", "absolute"),
    ("a\0b", "NUL"),
])
def test_split_name_rejects_escapes_naming_the_entry(name, why):
    with pytest.raises(FormatError, match=why) as info:
        split_name(name)
    assert repr(name) in str(info.value)


def entry(name, kind=Kind.FILE, **kw):
    return TarEntry(name=name, kind=kind, **kw)


def test_plan_entries():
    assert plan_entry(entry("./a/b")) == Put(("a", "b"), entry("./a/b"))
    assert plan_entry(entry("a/.wh.b")) == Whiteout(("a", "b"))
    assert plan_entry(entry(".wh.top")) == Whiteout(("top",))
    assert plan_entry(entry("a/.wh..wh..opq")) == Opaque(("a",))
    assert plan_entry(entry(".wh..wh..opq")) == Opaque(())
    assert plan_entry(entry("a/.wh..wh.aufs")) is None
    root = entry("./", Kind.DIR, mode=0o755)
    assert plan_entry(root) == Put((), root)
    link = entry("x/y", Kind.HARDLINK, linkname="./a/b")
    assert plan_entry(link) == Put(("x", "y"), link, ("a", "b"))


@pytest.mark.parametrize("bad, match", [
    (entry("./", Kind.FILE), "root can only be a directory"),
    (entry("a/.wh."), "names nothing"),
    (entry("a/.wh..."), "names nothing"),
    (entry("x", Kind.HARDLINK, linkname="../../etc/shadow"), "climbs out"),
    (entry("x", Kind.HARDLINK, linkname="/etc/shadow"), "absolute"),
    (entry("x", Kind.HARDLINK, linkname="."), "root directory"),
    (entry("x", Kind.HARDLINK, linkname="./x"), "itself"),
    (entry("x", Kind.SYMLINK, linkname=""), "empty target"),
])
def test_plan_rejects(bad, match):
    with pytest.raises(FormatError, match=match):
        plan_entry(bad)


def test_symlink_targets_are_not_checked():
    """A symlink is only a name; pointing anywhere is fine (writes *through* it are checked)."""
    for target in ("/etc/passwd", "../../../../etc", "../nowhere"):
        assert isinstance(plan_entry(entry("l", Kind.SYMLINK, linkname=target)), Put)


# ---------------------------------------------------------------- Walk against a model filesystem


def drive(walk: Walk, fs: dict[tuple, object]) -> tuple[str, tuple]:
    """Run *walk* over a model: path -> "dir" or ("link", target). Missing -> ("missing", path)."""
    current: list[tuple] = [()]
    for _ in range(1000):
        step = walk.step()
        if isinstance(step, Done):
            assert step.path == current[-1]
            return "done", step.path
        if isinstance(step, Up):
            current.pop()
            continue
        assert isinstance(step, Lookup)
        path = current[-1] + (step.name,)
        node = fs.get(path)
        if node == "dir":
            walk.enter()
            current.append(path)
        elif isinstance(node, tuple):
            if isinstance(walk.follow(node[1]), Restart):
                current[1:] = []
        else:
            return "missing", path
    raise AssertionError("walk did not end")


FS = {
    ("usr",): "dir", ("usr", "lib"): "dir", ("etc",): "dir",
    ("lib",): ("link", "usr/lib"),
    ("var",): "dir", ("var", "run"): ("link", "/run"), ("run",): "dir",
    ("abs",): ("link", "/usr/lib"),
    ("up",): ("link", "../.."),
    ("self",): ("link", "self"),
    ("etc", "up1"): ("link", ".."),
}


@pytest.mark.parametrize("path, expected", [
    (("lib",), ("done", ("usr", "lib"))),
    (("var", "run"), ("done", ("run",))),
    (("abs",), ("done", ("usr", "lib"))),
    (("etc", "up1", "usr"), ("done", ("usr",))),
    (("usr", "nope", "x"), ("missing", ("usr", "nope"))),
])
def test_walk_resolves_symlinks_inside_the_root(path, expected):
    assert drive(Walk(path, "entry"), FS) == expected


@pytest.mark.parametrize("path, match", [
    (("up",), "leaves the root"),
    (("etc", "up1", ".."), "leaves the root"),
    (("self",), "too many levels"),
])
def test_walk_refuses_to_leave_the_root(path, match):
    with pytest.raises(FormatError, match=match):
        drive(Walk(path, "evil/entry"), FS)


names = st.sampled_from(["a", "b", "c", "..", "."])
targets = st.lists(names, min_size=1, max_size=4).map("/".join) | st.sampled_from(["/", "/a", "/a/b", "/.."])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(tuple),
                       st.just("dir") | targets.map(lambda t: ("link", t)), max_size=8),
       st.lists(names, max_size=5).map(tuple))
def test_walk_never_resolves_outside_and_agrees_with_posix(fs, path):
    """Against a reference resolver (posixpath over the model): same answer, or a refusal when it climbs out."""
    fs = {p: v for p, v in fs.items() if all(fs.get(p[:i]) == "dir" for i in range(1, len(p)))}
    try:
        outcome = drive(Walk(path, "e"), fs)
    except FormatError as exc:
        assert "leaves the root" in str(exc) or "too many levels" in str(exc)
        return
    kind, resolved = outcome
    assert all(c not in ("", ".", "..") for c in resolved)
    if kind == "done":
        assert resolved == () or fs.get(resolved) == "dir"
        assert reference_resolve(fs, path) == resolved


def reference_resolve(fs, path):
    """What a process chrooted at the root gets (where `..` never climbs out, since Walk refused those)."""
    parts = list(path)
    current: list[str] = []
    while parts:
        c = parts.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            current = current[:-1]
            continue
        node = fs.get(tuple(current + [c]))
        if isinstance(node, tuple):
            target = node[1]
            parts = target.split("/") + parts
            if target.startswith("/"):
                current = []
            continue
        current.append(c)
    return tuple(current)


def test_upper_paths_hold_ancestors():
    upper = UpperPaths()
    upper.add(("a", "b", "c"))
    assert ("a",) in upper and ("a", "b") in upper and ("a", "b", "c") in upper
    assert ("a", "x") not in upper and () not in upper


# ---------------------------------------------------------------- sizing


def test_stats_count_what_a_layer_needs():
    stats = LayerStats()
    stats.add(entry("f", size=1), plan_entry(entry("f", size=1)))
    stats.add(entry("d", Kind.DIR), plan_entry(entry("d", Kind.DIR)))
    stats.add(entry(".wh.x"), plan_entry(entry(".wh.x")))
    link = entry("h", Kind.HARDLINK, linkname="f")
    stats.add(link, plan_entry(link))
    sparse = entry("s", size=1 << 30, sparse=((0, 10), (1 << 29, 5000)))
    stats.add(sparse, plan_entry(sparse))
    assert stats.entries == 5 and stats.inodes == 3
    assert stats.data_bytes == 4096 + 4096 + 4096 + 8192 + 3 * 64


def test_fs_size_is_a_pure_function_and_only_grows():
    small = LayerStats(entries=10, inodes=10, data_bytes=10 * MIB)
    first = next_fs_size(None, small)
    assert first == next_fs_size(None, small) and first % (128 * MIB) == 0
    roomy = FsUsage(size=first, free_bytes=first - 50 * MIB, inodes=first // 16384, free_inodes=first // 16384 - 20)
    assert next_fs_size(roomy, small) is None
    big = LayerStats(entries=10, inodes=10, data_bytes=2 << 30)
    grown = next_fs_size(roomy, big)
    assert grown > first and grown >= (2 << 30) + 256 * MIB
    many_files = LayerStats(entries=500_000, inodes=500_000, data_bytes=10 * MIB)
    assert next_fs_size(roomy, many_files) // 16384 >= 500_000
