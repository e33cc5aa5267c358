"""The ring layout in ring.py is the one the C compiler derives from the kernel uapi header."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lazyfs.serve.tcmu import ring as R

HEADER = Path("/usr/include/linux/target_core_user.h")

# Python value -> C expression, for every field and constant ring.py relies on.
EXPECTED = {
    "MAILBOX_VERSION": (R.MAILBOX_VERSION, "TCMU_MAILBOX_VERSION"),
    "ALIGN_SIZE": (R.ALIGN_SIZE, "ALIGN_SIZE"),
    "CAP_OOOC": (R.CAP_OOOC, "TCMU_MAILBOX_FLAG_CAP_OOOC"),
    "CAP_READ_LEN": (R.CAP_READ_LEN, "TCMU_MAILBOX_FLAG_CAP_READ_LEN"),
    "CAP_TMR": (R.CAP_TMR, "TCMU_MAILBOX_FLAG_CAP_TMR"),
    "CAP_KEEP_BUF": (R.CAP_KEEP_BUF, "TCMU_MAILBOX_FLAG_CAP_KEEP_BUF"),
    "OP_PAD": (R.OP_PAD, "TCMU_OP_PAD"),
    "OP_CMD": (R.OP_CMD, "TCMU_OP_CMD"),
    "OP_TMR": (R.OP_TMR, "TCMU_OP_TMR"),
    "OP_MASK": (R.OP_MASK, "TCMU_OP_MASK"),
    "OP_ALIGN_SIZE": (R.OP_ALIGN_SIZE, "TCMU_OP_ALIGN_SIZE"),
    "UFLAG_UNKNOWN_OP": (R.UFLAG_UNKNOWN_OP, "TCMU_UFLAG_UNKNOWN_OP"),
    "UFLAG_READ_LEN": (R.UFLAG_READ_LEN, "TCMU_UFLAG_READ_LEN"),
    "UFLAG_KEEP_BUF": (R.UFLAG_KEEP_BUF, "TCMU_UFLAG_KEEP_BUF"),
    "SENSE_BUFFERSIZE": (R.SENSE_BUFFERSIZE, "TCMU_SENSE_BUFFERSIZE"),
    "TMR_UNKNOWN": (R.TMR_UNKNOWN, "TCMU_TMR_UNKNOWN"),
    "TMR_ABORT_TASK": (R.TMR_ABORT_TASK, "TCMU_TMR_ABORT_TASK"),
    "TMR_ABORT_TASK_SET": (R.TMR_ABORT_TASK_SET, "TCMU_TMR_ABORT_TASK_SET"),
    "TMR_CLEAR_ACA": (R.TMR_CLEAR_ACA, "TCMU_TMR_CLEAR_ACA"),
    "TMR_CLEAR_TASK_SET": (R.TMR_CLEAR_TASK_SET, "TCMU_TMR_CLEAR_TASK_SET"),
    "TMR_LUN_RESET": (R.TMR_LUN_RESET, "TCMU_TMR_LUN_RESET"),
    "TMR_TARGET_WARM_RESET": (R.TMR_TARGET_WARM_RESET, "TCMU_TMR_TARGET_WARM_RESET"),
    "TMR_TARGET_COLD_RESET": (R.TMR_TARGET_COLD_RESET, "TCMU_TMR_TARGET_COLD_RESET"),
    "TMR_LUN_RESET_PRO": (R.TMR_LUN_RESET_PRO, "TCMU_TMR_LUN_RESET_PRO"),
    # struct tcmu_mailbox
    "MAILBOX_SIZE": (R.MAILBOX_SIZE, "sizeof(struct tcmu_mailbox)"),
    "MB_VERSION": (R.MB_VERSION, "offsetof(struct tcmu_mailbox, version)"),
    "MB_FLAGS": (R.MB_FLAGS, "offsetof(struct tcmu_mailbox, flags)"),
    "MB_CMDR_OFF": (R.MB_CMDR_OFF, "offsetof(struct tcmu_mailbox, cmdr_off)"),
    "MB_CMDR_SIZE": (R.MB_CMDR_SIZE, "offsetof(struct tcmu_mailbox, cmdr_size)"),
    "MB_CMD_HEAD": (R.MB_CMD_HEAD, "offsetof(struct tcmu_mailbox, cmd_head)"),
    "MB_CMD_TAIL": (R.MB_CMD_TAIL, "offsetof(struct tcmu_mailbox, cmd_tail)"),
    "sizeof(version)": (2, "sizeof(((struct tcmu_mailbox *)0)->version)"),
    "sizeof(flags)": (2, "sizeof(((struct tcmu_mailbox *)0)->flags)"),
    "sizeof(cmd_head)": (4, "sizeof(((struct tcmu_mailbox *)0)->cmd_head)"),
    "sizeof(cmd_tail)": (4, "sizeof(((struct tcmu_mailbox *)0)->cmd_tail)"),
    # struct tcmu_cmd_entry_hdr
    "HDR_SIZE": (R.HDR_SIZE, "sizeof(struct tcmu_cmd_entry_hdr)"),
    "HDR_LEN_OP": (R.HDR_LEN_OP, "offsetof(struct tcmu_cmd_entry_hdr, len_op)"),
    "HDR_CMD_ID": (R.HDR_CMD_ID, "offsetof(struct tcmu_cmd_entry_hdr, cmd_id)"),
    "HDR_KFLAGS": (R.HDR_KFLAGS, "offsetof(struct tcmu_cmd_entry_hdr, kflags)"),
    "HDR_UFLAGS": (R.HDR_UFLAGS, "offsetof(struct tcmu_cmd_entry_hdr, uflags)"),
    "sizeof(cmd_id)": (2, "sizeof(((struct tcmu_cmd_entry_hdr *)0)->cmd_id)"),
    # struct tcmu_cmd_entry
    "CMD_ENTRY_SIZE": (R.CMD_ENTRY_SIZE, "sizeof(struct tcmu_cmd_entry)"),
    "REQ_IOV_CNT": (R.REQ_IOV_CNT, "offsetof(struct tcmu_cmd_entry, req.iov_cnt)"),
    "REQ_IOV_BIDI_CNT": (R.REQ_IOV_BIDI_CNT, "offsetof(struct tcmu_cmd_entry, req.iov_bidi_cnt)"),
    "REQ_IOV_DIF_CNT": (R.REQ_IOV_DIF_CNT, "offsetof(struct tcmu_cmd_entry, req.iov_dif_cnt)"),
    "REQ_CDB_OFF": (R.REQ_CDB_OFF, "offsetof(struct tcmu_cmd_entry, req.cdb_off)"),
    "REQ_IOV": (R.REQ_IOV, "offsetof(struct tcmu_cmd_entry, req.iov)"),
    "sizeof(cdb_off)": (8, "sizeof(((struct tcmu_cmd_entry *)0)->req.cdb_off)"),
    "IOVEC_SIZE": (R.IOVEC_SIZE, "sizeof(struct iovec)"),
    "IOVEC_BASE": (R.IOVEC_BASE, "offsetof(struct iovec, iov_base)"),
    "IOVEC_LEN": (R.IOVEC_LEN, "offsetof(struct iovec, iov_len)"),
    "RSP_SCSI_STATUS": (R.RSP_SCSI_STATUS, "offsetof(struct tcmu_cmd_entry, rsp.scsi_status)"),
    "RSP_READ_LEN": (R.RSP_READ_LEN, "offsetof(struct tcmu_cmd_entry, rsp.read_len)"),
    "RSP_SENSE_BUFFER": (R.RSP_SENSE_BUFFER, "offsetof(struct tcmu_cmd_entry, rsp.sense_buffer)"),
    "sizeof(sense_buffer)": (R.SENSE_BUFFERSIZE, "sizeof(((struct tcmu_cmd_entry *)0)->rsp.sense_buffer)"),
    "sizeof(read_len)": (4, "sizeof(((struct tcmu_cmd_entry *)0)->rsp.read_len)"),
    # struct tcmu_tmr_entry
    "TMR_ENTRY_SIZE": (R.TMR_ENTRY_SIZE, "sizeof(struct tcmu_tmr_entry)"),
    "TMR_TYPE": (R.TMR_TYPE, "offsetof(struct tcmu_tmr_entry, tmr_type)"),
    "TMR_CMD_CNT": (R.TMR_CMD_CNT, "offsetof(struct tcmu_tmr_entry, cmd_cnt)"),
    "TMR_CMD_IDS": (R.TMR_CMD_IDS, "offsetof(struct tcmu_tmr_entry, cmd_ids)"),
    "sizeof(cmd_ids[0])": (2, "sizeof(((struct tcmu_tmr_entry *)0)->cmd_ids[0])"),
    # the kernel's own entry sizing: max(offsetof(req.iov[n]), sizeof(entry)) + align8(cdb)
    "cmd_entry_size(0, 16)": (R.cmd_entry_size(0, 16)[1], "ENTRY_SIZE(0, 16)"),
    "cmd_entry_size(4, 10)": (R.cmd_entry_size(4, 10)[1], "ENTRY_SIZE(4, 10)"),
    "cmd_entry_size(5, 16)": (R.cmd_entry_size(5, 16)[1], "ENTRY_SIZE(5, 16)"),
    "cmd_entry_size(33, 12)": (R.cmd_entry_size(33, 12)[1], "ENTRY_SIZE(33, 12)"),
    "cmd_entry_size(3, 6)": (R.cmd_entry_size(3, 6)[1], "ENTRY_SIZE(3, 6)"),
}

PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/target_core_user.h>

#define ROUND_UP(x, a) (((x) + (a) - 1) / (a) * (a))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define ENTRY_SIZE(n, cdb) (MAX(offsetof(struct tcmu_cmd_entry, req.iov) + (n) * sizeof(struct iovec), \
                                sizeof(struct tcmu_cmd_entry)) + ROUND_UP((cdb), TCMU_OP_ALIGN_SIZE))

int main(void) {
%s
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_values(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None or not HEADER.exists():
        pytest.skip(f"no C compiler ({gcc}) or no {HEADER}: cannot compare against the uapi header")
    body = "\n".join(f'    printf("%s=%%lld\\n", (long long)({expr}));' % key for key, (_, expr) in EXPECTED.items())
    tmp = tmp_path_factory.mktemp("abi")
    src, exe = tmp / "abi.c", tmp / "abi"
    src.write_text(PROGRAM % body)
    build = subprocess.run([gcc, "-Wall", "-Werror", "-o", str(exe), str(src)], capture_output=True, text=True,
                           timeout=60)
    assert build.returncode == 0, f"compiling against {HEADER} failed:\n{build.stderr}"
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.mark.parametrize("key", list(EXPECTED))
def test_matches_uapi_header(c_values, key):
    assert int(c_values[key]) == EXPECTED[key][0], f"{key}: C says {c_values[key]}, ring.py says {EXPECTED[key][0]}"


def test_every_ring_constant_is_checked():
    """A new layout constant in ring.py must be added to EXPECTED."""
    names = [n for n in dir(R) if n.isupper() and not n.startswith("_") and isinstance(getattr(R, n), int)]
    # lazyfs's own: its marks in a response's uflags (ring.py, restartable rings) and SAM BUSY
    own = {"VARIABLE_LENGTH_CMD", "MAX_CDB_SIZE", "UFLAG_ANSWERING", "UFLAG_ANSWERED", "STATUS_BUSY"}
    unchecked = set(names) - set(EXPECTED) - own
    assert not unchecked, f"not compared with the C header: {sorted(unchecked)}"
    kernel_uflags = R.UFLAG_UNKNOWN_OP | R.UFLAG_READ_LEN | R.UFLAG_KEEP_BUF
    assert not (R.UFLAG_ANSWERING | R.UFLAG_ANSWERED) & kernel_uflags and R.UFLAG_ANSWERING != R.UFLAG_ANSWERED


# --- byte-level round trip through the C structs ----------------------------------------------
# Offsets alone do not prove the parser and writer: C fills entries field by field, ring.py
# parses them; ring.py writes a response, C reads it back field by field.

ROUNDTRIP = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/target_core_user.h>

static unsigned char buf[1024];

static void dump(const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", ((const unsigned char *)p)[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc > 1) {  /* decode the response entry given as hex */
        size_t n = strlen(argv[1]) / 2;
        for (size_t i = 0; i < n && i < sizeof(buf); i++) sscanf(argv[1] + 2 * i, "%2hhx", &buf[i]);
        struct tcmu_cmd_entry *e = (void *)buf;
        printf("%u %u %u %u %u %u %u %u %u\n", tcmu_hdr_get_len(e->hdr.len_op), tcmu_hdr_get_op(e->hdr.len_op),
               e->hdr.cmd_id, e->hdr.kflags, e->hdr.uflags, e->rsp.scsi_status, e->rsp.read_len,
               (unsigned char)e->rsp.sense_buffer[0], (unsigned char)e->rsp.sense_buffer[13]);
        return 0;
    }
    /* a CMD entry with 2 data iovecs + 1 bidi iovec and a 16-byte CDB, at ring offset 0 */
    struct tcmu_cmd_entry *e = (void *)buf;
    size_t base = offsetof(struct tcmu_cmd_entry, req.iov) + 3 * sizeof(struct iovec);
    if (base < sizeof(struct tcmu_cmd_entry)) base = sizeof(struct tcmu_cmd_entry);
    size_t len = base + 16;
    memset(buf, 0, sizeof(buf));
    __u32 len_op = 0;  /* the header is packed: build len_op in an aligned local */
    tcmu_hdr_set_op(&len_op, TCMU_OP_CMD);
    tcmu_hdr_set_len(&len_op, len);
    e->hdr.len_op = len_op;
    e->hdr.cmd_id = 4242;
    e->hdr.kflags = 5;
    e->req.iov_cnt = 2;
    e->req.iov_bidi_cnt = 1;
    e->req.iov_dif_cnt = 0;
    e->req.cdb_off = sizeof(struct tcmu_mailbox) + base;
    e->req.iov[0].iov_base = (void *)(uintptr_t)(DATA_OFF + 8192);
    e->req.iov[0].iov_len = 4096;
    e->req.iov[1].iov_base = (void *)(uintptr_t)(DATA_OFF);
    e->req.iov[1].iov_len = 100;
    e->req.iov[2].iov_base = (void *)(uintptr_t)(DATA_OFF + 40960);
    e->req.iov[2].iov_len = 7;
    for (int i = 0; i < 16; i++) buf[base + i] = (unsigned char)(0x88 + i);
    dump(buf, len);
    /* a TMR entry listing three commands */
    struct tcmu_tmr_entry *t = (void *)buf;
    size_t tlen = (sizeof(*t) + 3 * sizeof(t->cmd_ids[0]) + 7) / 8 * 8;
    memset(buf, 0, sizeof(buf));
    len_op = 0;
    tcmu_hdr_set_op(&len_op, TCMU_OP_TMR);
    tcmu_hdr_set_len(&len_op, tlen);
    t->hdr.len_op = len_op;
    t->tmr_type = TCMU_TMR_LUN_RESET;
    t->cmd_cnt = 3;
    t->cmd_ids[0] = 7; t->cmd_ids[1] = 65535; t->cmd_ids[2] = 300;
    dump(buf, tlen);
    return 0;
}
"""

RT_CMDR_SIZE = 4096
RT_DATA_OFF = R.MAILBOX_SIZE + RT_CMDR_SIZE


@pytest.fixture(scope="module")
def roundtrip_exe(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None or not HEADER.exists():
        pytest.skip(f"no C compiler ({gcc}) or no {HEADER}: cannot compare against the uapi header")
    tmp = tmp_path_factory.mktemp("roundtrip")
    src, exe = tmp / "rt.c", tmp / "rt"
    src.write_text(ROUNDTRIP)
    build = subprocess.run([gcc, "-Wall", "-Werror", f"-DDATA_OFF={RT_DATA_OFF}", "-o", str(exe), str(src)],
                           capture_output=True, text=True, timeout=60)
    assert build.returncode == 0, build.stderr
    return exe


def test_c_built_entries_parse_and_our_response_reads_back_in_c(roundtrip_exe):
    import struct

    cmd_hex, tmr_hex = subprocess.run([str(roundtrip_exe)], check=True, capture_output=True, text=True,
                                      timeout=30).stdout.split()
    cmd, tmr = bytes.fromhex(cmd_hex), bytes.fromhex(tmr_hex)
    region = bytearray(RT_DATA_OFF + 65536)
    struct.pack_into("=H", region, R.MB_VERSION, R.MAILBOX_VERSION)
    struct.pack_into("=H", region, R.MB_FLAGS, R.CAP_OOOC | R.CAP_READ_LEN)
    struct.pack_into("=I", region, R.MB_CMDR_OFF, R.MAILBOX_SIZE)
    struct.pack_into("=I", region, R.MB_CMDR_SIZE, RT_CMDR_SIZE)
    ring = R.Ring(memoryview(region))
    base = R.MAILBOX_SIZE
    region[base : base + len(cmd)] = cmd
    region[base + len(cmd) : base + len(cmd) + len(tmr)] = tmr
    struct.pack_into("=I", region, R.MB_CMD_HEAD, len(cmd) + len(tmr))
    events = ring.receive()
    assert events == [
        R.Command(4242, bytes(range(0x88, 0x98)),
                  (R.Iovec(RT_DATA_OFF + 8192, 4096), R.Iovec(RT_DATA_OFF, 100)),
                  (R.Iovec(RT_DATA_OFF + 40960, 7),), kflags=5),
        R.TaskManagement(R.TMR_LUN_RESET, (7, 65535, 300)),
    ]
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x99])
    ring.complete(4242, 2, sense, read_len=123456)
    response = bytes(region[base : base + len(cmd)])
    out = subprocess.run([str(roundtrip_exe), response.hex()], check=True, capture_output=True, text=True,
                         timeout=30).stdout.split()
    length, op, cmd_id, kflags, uflags, status, read_len, sense0, sense13 = map(int, out)
    assert (length, op, cmd_id, kflags) == (len(cmd), R.OP_CMD, 4242, 5)
    assert (uflags, status, read_len) == (R.UFLAG_READ_LEN, 2, 123456)
    assert (sense0, sense13) == (0x70, 0x99)
    assert struct.unpack_from("=I", region, R.MB_CMD_TAIL)[0] == len(cmd) + len(tmr)
