"""configfs planning, the executor's idempotency, and the errors on hosts without TCMU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from lazyfs.errors import BusyError, ConfigError, NotFoundError
from lazyfs.serve.tcmu import configfs as C
from lazyfs.serve.tcmu.scsi import DeviceInfo
from tests.support.memory import MemorySource


def test_missing_module_or_configfs_is_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match="target_core_user not available: kernel module target_core_user"):
        C.check_available(tmp_path / "target", sys_module=tmp_path)
    (tmp_path / "target_core_user").mkdir()
    with pytest.raises(ConfigError, match=r"target_core_user not available: .*target missing \(mount configfs"):
        C.check_available(tmp_path / "target", sys_module=tmp_path)
    (tmp_path / "target").mkdir()
    C.check_available(tmp_path / "target", sys_module=tmp_path)


def test_attach_reports_what_this_host_lacks():
    try:
        C.check_available()
    except ConfigError as exc:
        reason = str(exc)
    else:
        pytest.skip("this host has target_core_user; the real-kernel test covers attach")

    async def main():
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConfigError) as info:
                await C.attach(MemorySource(1 << 20), "nope", nursery=nursery)
            assert str(info.value) == reason

    trio.run(main)


@pytest.mark.parametrize("name", ["", "a/b", "a,b", "-x", "a b", "x" * 65, "ä"])
def test_bad_names_are_refused(name):
    with pytest.raises(ConfigError):
        C.validate_name(name)


def test_detach_of_unknown_device_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        trio.run(lambda: C.detach("ghost", configfs=tmp_path))


def test_layout_is_stable_and_well_formed():
    a, b = C.Layout("img-1"), C.Layout("img-2")
    assert a == C.Layout("img-1") and a.hba_id == C.Layout("img-1").hba_id
    assert a.hba_id != b.hba_id and a.target_wwn != b.target_wwn
    assert re.fullmatch(r"naa\.3[0-9a-f]{15}", a.target_wwn) and re.fullmatch(r"naa\.3[0-9a-f]{15}", a.initiator_wwn)
    assert a.target_wwn != a.initiator_wwn
    assert a.backstore == Path(f"/sys/kernel/config/target/core/user_{a.hba_id}/img-1")
    assert a.uio_name == f"tcm-user/{a.hba_id}/img-1/lazyfs/img-1"
    assert a.lun_dir == Path(f"/sys/kernel/config/target/loopback/{a.target_wwn}/tpgt_1/lun/lun_0")


def test_plan_contents_and_order():
    layout = C.Layout("img")
    info = DeviceInfo(name="img", size=(64 << 20) + 100, block_size=4096)
    steps = C.plan_backstore(layout, info)
    assert steps[:2] == [C.Mkdir(layout.hba_dir), C.Mkdir(layout.backstore)]
    assert steps[2] == C.WriteAttr(layout.backstore / "control",
                                   f"dev_size={64 << 20},dev_config=lazyfs/img,hw_block_size=4096,"
                                   f"hw_max_sectors={info.max_transfer_blocks},nl_reply_supported=-1")
    assert steps[3] == C.WriteAttr(layout.backstore / "enable", "1")
    # commands wait on the ring across a daemon restart, never failed by the ring's own timeout
    assert steps[4] == C.WriteAttr(layout.backstore / "attrib" / "cmd_time_out", "0")
    fabric = C.plan_fabric(layout)
    assert fabric[-1] == C.Symlink(layout.backstore, layout.lun_link)
    assert C.WriteAttr(layout.tpg_dir / "nexus", layout.initiator_wwn) in fabric
    # teardown removes, in reverse, what setup made (the shared loopback dir stays)
    made = [s.path for s in fabric if isinstance(s, C.Mkdir)][1:] + [layout.lun_link]
    removed = [s.path for s in C.plan_fabric_teardown(layout)]
    assert removed == list(reversed(made))
    assert [s.path for s in C.plan_backstore_teardown(layout)] == [layout.backstore, layout.hba_dir]


def test_executor_is_idempotent(tmp_path):
    """Every step kind succeeds when its work is already done (setup) or undone (teardown)."""
    d, link = tmp_path / "dir", tmp_path / "link"
    setup = [C.Mkdir(d), C.WriteAttr(d / "control", "dev_size=1"), C.Symlink(d, link)]
    for _ in range(2):
        for step in setup:
            C.apply(step)
    assert link.resolve() == d and (d / "control").read_text() == "dev_size=1"
    (d / "control").unlink()  # configfs drops attribute files itself
    for _ in range(2):
        for step in (C.Unlink(link), C.Rmdir(d)):
            C.apply(step)
    assert not link.is_symlink() and not d.exists()
    d.mkdir()
    (d / "busy").mkdir()
    with pytest.raises(BusyError):
        C.apply(C.Rmdir(d))
