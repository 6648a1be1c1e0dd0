"""What one receiver is told (``pagehaul receive``), for every transport.

The session registry (``receiver.registry``) reads the sessions' bounds; a transport adapter
(``receiver.grpc_server``) reads the listener's fields (``listen``, ``security``, ``grace_s``,
``idle_timeout_s``) and serves the Restore RPC when ``restore`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pagehaul.metrics import ReceiverMetrics
from pagehaul.security import Security
from receiver.restore import RestoreConfig
from receiver.session import SessionLimits


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    images_dir: Path
    listen: str = "127.0.0.1:0"
    limits: SessionLimits = field(default_factory=SessionLimits)
    grace_s: float = 10.0
    # The CLI makes users choose; the Python API defaults to plain TCP for in-process use.
    security: Security = field(default_factory=lambda: Security(insecure=True))
    # Sessions (live or waiting to be resumed) at once.
    max_sessions: int = 16
    # How long a session whose connection broke waits to be resumed before its open round goes.
    resume_window_s: float = 60.0
    metrics: ReceiverMetrics = field(default_factory=ReceiverMetrics)
    # A stream that delivers nothing for this long is treated as a lost connection.
    idle_timeout_s: float = 60.0
    # Page bytes all sessions together may write, counting what the images dir held at start.
    max_total_bytes: int | None = None
    # Also serve the Restore RPC (full migration: criu restore of a committed session).
    restore: RestoreConfig | None = None
    # Files the open rounds of all sessions may hold (None: RLIMIT_NOFILE less what is open at
    # start and FD_RESERVE); each session gets at most an equal share of max_sessions.
    max_open_files: int | None = None
