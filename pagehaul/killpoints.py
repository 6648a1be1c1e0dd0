"""Test-only kill points: the sender (or the receiver) SIGKILLs itself at a named step.

Some windows (a system call injected into the target) last microseconds; killing the sender from
outside lands in them only by chance. ``PAGEHAUL_TEST_KILL_AT=NAME[:N]`` makes this process
SIGKILL itself the Nth time (the first by default) it passes the point ``killpoint(NAME)``, so a
test can kill it at every step of such a window in turn. The variable is read once, at import;
unset, a kill point costs one comparison.
"""

from __future__ import annotations

import os
import signal
from typing import Final

ENV: Final = "PAGEHAUL_TEST_KILL_AT"

_name, _, _nth = os.environ.get(ENV, "").partition(":")
_NAME: Final = _name
_NTH: Final = int(_nth or "1")
_seen = 0


def killpoint(name: str) -> None:
    """SIGKILL this process if ``name`` is the armed kill point and this is its Nth passage."""
    global _seen  # noqa: PLW0603 - one counter for the whole process, by design
    if name != _NAME:
        return
    _seen += 1
    if _seen == _NTH:
        os.kill(os.getpid(), signal.SIGKILL)
