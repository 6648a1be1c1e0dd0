"""CRIU's page-server protocol on the wire (criu/page-xfer.c, CRIU 4.2): the constants both ends
of pagehaul use. The receiver speaks it as a page server (``receiver.pageserver``); the sender
ends the page server of a lazy ``criu dump`` with it (``sender.migrate``)."""

from __future__ import annotations

import struct
from typing import Final

PAGE_SERVER_IOV: Final = struct.Struct("<I4xQQQ")  # struct page_server_iov: 4 pad bytes after cmd
assert PAGE_SERVER_IOV.size == 32

PS_IOV_ADD: Final = 1
PS_IOV_HOLE: Final = 2
PS_IOV_OPEN: Final = 3
PS_IOV_OPEN2: Final = 4
PS_IOV_PARENT: Final = 5
PS_IOV_ADD_F: Final = 6
PS_IOV_GET: Final = 7
PS_IOV_CLOSE: Final = 0x1023
PS_IOV_FORCE_CLOSE: Final = 0x1024

PS_CMD_BITS: Final = 16
PS_CMD_MASK: Final = (1 << PS_CMD_BITS) - 1
PS_TYPE_BITS: Final = 8
PS_TYPE_MASK: Final = (1 << PS_TYPE_BITS) - 1
PS_TYPE_PID: Final = 1
PS_TYPE_SHMEM: Final = 2
# decode_pm: type codes of older CRIUs, which sent their changing CR_FD_* numbers.
LEGACY_PID_TYPES: Final = frozenset({10, 11, 16, 17})
LEGACY_SHMEM_TYPES: Final = frozenset({27, 28, 29, 32, 33, 34})

# criu/image.c: page_ids starts at 1; up_page_ids_base() adds 0x10000 in the page server.
PAGE_IDS_BASE: Final = 1 + 0x10000
# include/linux/threads.h PID_MAX_LIMIT on 64-bit: no vpid is larger.
PID_MAX_LIMIT: Final = 4 * 1024 * 1024
# No user address (nor shmem offset) reaches 2**56: x86_64 TASK_SIZE with 5-level paging is
# 2**56 - 4096 (arch/x86/include/asm/page_64_types.h); CRIU does not dump [vsyscall].
ADDRESS_LIMIT: Final = 1 << 56

STATUS_OK: Final = 0
STATUS_REPLY: Final = struct.Struct("<i")  # the int32 reply to CLOSE and the int reply to PARENT
