"""KeyedLocks: one lock per key, and no entry left for a key nobody uses.

Broken on purpose once: without the ``del`` of an unused entry, 200 snapshots left 200 entries
and test_entries_are_dropped_when_unused failed.
"""

import threading

from lazyfs.serve.snapshotter.locks import KeyedLocks


def test_entries_are_dropped_when_unused():
    locks = KeyedLocks()
    for snapshot_id in range(200):  # 200 snapshots prepared and removed, one after the other
        with locks.hold(snapshot_id):
            assert len(locks) == 1
    assert len(locks) == 0


def test_one_key_waits_only_for_itself():
    locks = KeyedLocks()
    held, release, other_done = threading.Event(), threading.Event(), threading.Event()
    order = []

    def hold_a():
        with locks.hold("a"):
            held.set()
            release.wait(30)
            order.append("a released")

    def take_b_then_a():
        with locks.hold("b"):
            order.append("b")
        other_done.set()
        with locks.hold("a"):
            order.append("a again")

    first = threading.Thread(target=hold_a)
    first.start()
    held.wait(30)
    second = threading.Thread(target=take_b_then_a)
    second.start()
    other_done.wait(30)  # "b" went through while "a" is held
    assert order == ["b"]
    release.set()
    first.join(30)
    second.join(30)
    assert order == ["b", "a released", "a again"]
    assert len(locks) == 0
