"""The pagehaul exception tree, and the exit code of each kind.

    PagehaulError                    exit 1
    ├── ProcessError                 (carries .pid)
    │   ├── ProcessGone              exit 3   no such process, or it exited mid-operation
    │   ├── AccessDenied             exit 4   permission refused (not root, LSM, ptrace_scope)
    │   └── AlreadyTraced            exit 4   another tracer (gdb, strace, CRIU) holds the process
    ├── KernelUnsupported            exit 7   the running kernel lacks a needed interface
    ├── TransportError               exit 5   receiver unreachable, connection lost, deadline passed
    │   └── RestoreUnknown           exit 10  the restore may have run, but its answer was lost
    ├── ProtocolError                exit 6   a peer sent something malformed (receiver: INVALID_ARGUMENT)
    │   └── IntegrityError           exit 6   checksum or size mismatch in a page batch
    ├── ImageError                   exit 8   a CRIU image file is malformed or inconsistent
    ├── NotConverged                 exit 9   pre-copy did not converge and the user chose to abort
    └── ConfigError                  exit 2   bad command-line or configuration value

Boundaries translate OSError into these with ``raise ... from err`` so messages carry the pid,
address or file involved; the CLI prints ``str(err)`` on one line and exits with ``exit_code``.
"""

from __future__ import annotations


class PagehaulError(Exception):
    """Base of every error pagehaul raises on purpose."""

    exit_code = 1


class ConfigError(PagehaulError):
    exit_code = 2


class ProcessError(PagehaulError):
    def __init__(self, pid: int, message: str) -> None:
        super().__init__(message)
        self.pid = pid


class ProcessGone(ProcessError):
    exit_code = 3


class AccessDenied(ProcessError):
    exit_code = 4


class AlreadyTraced(AccessDenied):
    def __init__(self, pid: int, tracer_pid: int) -> None:
        super().__init__(pid, f"process {pid} is already traced by process {tracer_pid}; "
                              "detach the other tool (gdb, strace, criu) first")
        self.tracer_pid = tracer_pid


class KernelUnsupported(PagehaulError):
    exit_code = 7


class TransportError(PagehaulError):
    exit_code = 5


class RestoreUnknown(TransportError):
    """Every image went to the destination and the connection broke before its answer: the tree
    may run there now, so the source must not be continued without someone looking."""

    exit_code = 10


class ProtocolError(PagehaulError):
    exit_code = 6


class IntegrityError(ProtocolError):
    pass


class ImageError(PagehaulError):
    exit_code = 8


class NotConverged(PagehaulError):
    """Pre-copy stopped converging and ``--on-no-convergence abort`` was asked: nothing was frozen."""

    exit_code = 9
