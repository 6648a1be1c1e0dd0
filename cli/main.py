"""``pagehaul`` command line: send, receive, demo.

Exit codes (see ``pagehaul.errors``): 0 success, 1 unexpected error, 2 usage or configuration,
3 process gone, 4 access denied or already traced, 5 transport (receiver unreachable, connection
lost), 6 protocol or integrity error reported by the peer, 7 kernel lacks a needed interface,
8 malformed image, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pagehaul import criu_opts
from pagehaul.errors import ConfigError, PagehaulError
from pagehaul.security import Security, TlsFiles

if TYPE_CHECKING:
    from receiver.config import ReceiverConfig
    from sender.config import SendConfig

log = logging.getLogger("pagehaul")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return value


# receiver.session.SessionLimits.max_hole_runs, for the help text only (the receiver is imported lazily;
# tests/unit/test_cli_receive.py checks that the two agree).
_HOLE_RUNS_DEFAULT = 1 << 22


def _whole(option: str, value: str | None, minimum: int) -> int | None:
    """A whole-number option checked after parsing, so that a bad value is one line (ConfigError)."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{option} must be a whole number, not {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{option} must be at least {minimum}, not {number}")
    return number


def _seconds(option: str, value: str | None) -> float | None:
    """A positive, finite duration option (seconds), checked like :func:`_whole`."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{option} must be a number of seconds, not {value!r}") from None
    if not 0 < number < float("inf"):
        raise ConfigError(f"{option} must be a positive number of seconds, not {value}")
    return number


_RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kbit": 125, "mbit": 125e3, "gbit": 125e6}


def _rate(value: str) -> float:
    """Bytes per second from '125M', '50k', '1gbit', '800mbit' (SI units, as tc)."""
    num = value.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = value[len(num):].lower().removesuffix("b/s").removesuffix("/s")
    try:
        rate = float(num) * _RATE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a rate like 125M (bytes/s) or 1gbit") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("a rate must be positive")
    return rate


def _zstd_level(value: str) -> int | str | None:
    if value in ("off", "auto"):
        return None if value == "off" else value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer level or 'off'") from None


def _add_security(p: argparse.ArgumentParser, role: str) -> None:
    g = p.add_argument_group("security (mutual TLS; one of --tls-* or --insecure is required)")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help=f"this {role}'s certificate")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help=f"this {role}'s private key")
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA certificate that signs the peer")
    g.add_argument("--token-file", type=Path, metavar="FILE", help="shared token, required on both sides if given")
    g.add_argument("--insecure", action="store_true", help="plain TCP, no authentication (loud warning)")


def _security(args: argparse.Namespace) -> Security:
    return Security.from_args(args.tls_cert, args.tls_key, args.tls_ca, args.token_file, args.insecure)


def _add_send_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pid", type=int, help="process to migrate, with all its descendants (the whole tree)")
    p.add_argument("--cgroup", metavar="PATH",
                   help="migrate every process of this cgroup v2 instead (a directory, or a path inside the "
                        "cgroup v2 hierarchy); frozen with its cgroup.freeze")
    p.add_argument("--no-children", action="store_true", help="with --pid: that process only, not its descendants")
    p.add_argument("--no-shmem", action="store_true",
                   help="leave out shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, SysV shm, memfd), "
                        "otherwise dumped once per object")
    p.add_argument("--to", type=_address, metavar="HOST:PORT", help="receiver address")
    p.add_argument("--tracker", default="auto", metavar="NAME",
                   help="dirty tracker: auto (default), none (one frozen round), uffd-wp, soft-dirty-scan, "
                        "soft-dirty-pagemap, hash")
    p.add_argument("--downtime-ms", type=float, default=50.0,
                   help="stop pre-copy when the final dump is estimated to take this long (default: 50)")
    p.add_argument("--max-rounds", type=int, default=8, help="live rounds at most (default: 8)")
    p.add_argument("--on-no-convergence", choices=("freeze", "throttle", "abort"), default="freeze",
                   help="when pre-copy stops converging: freeze anyway (default), throttle the target harder "
                        "and go on, or abort with the source running (exit 9)")
    p.add_argument("--auto-converge", action="store_true",
                   help="throttle the process when it dirties memory faster than it can be sent")
    p.add_argument("--freeze-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="thaw the source and fail if the final dump is not committed in time (default: 60)")
    p.add_argument("--pagemap-file", action="store_true",
                   help="read /proc/PID/pagemap instead of using the PAGEMAP_SCAN ioctl")
    p.add_argument("--zstd-level", type=_zstd_level, default=1, metavar="N|off|auto",
                   help="zstd compression level, 'off', or 'auto' (follow the bottleneck: lower when "
                        "compression limits, higher when the link does) (default: 1)")
    p.add_argument("--bandwidth-limit", type=_rate, default=None, metavar="RATE",
                   help="cap on the wire rate: bytes/s with k/M/G, or bits with kbit/mbit/gbit")
    p.add_argument("--workers", type=int, default=2, help="read/compress threads (default: 2)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--resume-deadline", type=float, default=30.0, metavar="SECONDS",
                   help="after a lost connection, keep trying to resume this long (default: 30)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--metrics-listen", type=_address, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics while migrating")
    _add_security(p, "sender")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagehaul", description="Move a running process's memory to another host.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = sub.add_parser("send", help="migrate a process's memory to a receiver (pre-copy, then a frozen dump)")
    _add_send_options(send)
    send.add_argument("--list-trackers", action="store_true", help="say which trackers this kernel supports")
    send.add_argument("--resume", action="store_true",
                      help="resume the process after the final dump (default: leave it stopped for the destination)")

    mig = sub.add_parser("migrate", help="move a running process tree to another host: memory with pagehaul "
                                         "(pre-copy), the rest with CRIU, restored there (receiver: --restore)")
    _add_send_options(mig)
    mig.add_argument("--criu", type=Path, default=None, metavar="PATH",
                     help="criu binary (default: the private CRIU 4.2.1 of scripts/install-criu.sh)")
    mig.add_argument("--tcp-close", action="store_true",
                     help="dump established TCP connections closed and restore them closed (clients reconnect)")
    mig.add_argument("--move-address", action="append", default=[], metavar="ADDR[/PREFIX]",
                     help="an IPv4 address that moves with the tree (repeatable): removed from its interface here "
                          "at the frozen point, added to the receiver's --service-device and announced there; "
                          "established TCP connections on it are kept (criu --tcp-established)")
    mig.add_argument("--shell-job", action="store_true",
                     help="the process was started from a terminal (its session or tty is outside the tree)")
    mig.add_argument("--dump-dir", type=Path, default=None, metavar="DIR",
                     help="where criu dumps locally before the memory is dropped (default: /dev/shm)")
    mig.add_argument("--keep-dump", action="store_true", help="keep criu's local dump directory")
    _criu_option_args(mig, "dump")
    mig.add_argument("--full-dump", action="store_true",
                     help="let criu copy all memory at the frozen point (no --lazy-pages); the default leaves memory "
                          "pagehaul tracks in the source and proves it unchanged with the dirty tracker")
    mig.add_argument("--check", action="store_true",
                     help="only check whether the tree can be migrated (criu, the tree, the receiver) and say what to "
                          "fix; nothing is frozen (exit 2 when a problem is found)")
    mig.add_argument("--restore-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="fail (and continue the source) if the destination has not restored in time (default: 300)")

    recv = sub.add_parser("receive", help="accept migrations and write CRIU image directories")
    recv.add_argument("--listen", type=_address, default="127.0.0.1:0", metavar="HOST:PORT",
                      help="address to listen on (port 0: pick a free one; default 127.0.0.1:0)")
    recv.add_argument("--images-dir", type=Path, required=True, help="one directory per session goes here")
    recv.add_argument("--metrics-listen", type=_address, metavar="HOST:PORT",
                      help="serve Prometheus metrics at http://HOST:PORT/metrics")
    recv.add_argument("--max-sessions", type=int, default=16, help="sessions at once (default: 16)")
    recv.add_argument("--resume-window", type=float, default=60.0, metavar="SECONDS",
                      help="keep a session whose connection broke this long for a resume (default: 60)")
    recv.add_argument("--max-session-bytes", type=_rate, default=None, metavar="SIZE",
                      help="disk quota of page bytes per session, e.g. 8G (default: none)")
    recv.add_argument("--max-total-bytes", type=_rate, default=None, metavar="SIZE",
                      help="disk quota of page bytes for all sessions, counting the images dir's (default: none)")
    recv.add_argument("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
                      help="treat a stream silent this long as a lost connection (default: 60)")
    recv.add_argument("--max-open-files", default=None, metavar="N",
                      help="files the open rounds of all sessions may hold, each session at most an equal share of "
                           "--max-sessions (default: the soft RLIMIT_NOFILE less what is open at start and 256)")
    recv.add_argument("--max-hole-runs", default=None, metavar="N",
                      help=f"zero and parent hole runs one round may hold in memory, 16 bytes each "
                           f"(default: {_HOLE_RUNS_DEFAULT})")
    recv.add_argument("--criu-page-server", type=_address, metavar="HOST:PORT",
                      help="also accept `criu dump --page-server` here (CRIU's protocol: plain TCP, no token)")
    recv.add_argument("--criu-page-server-tls", action="store_true",
                      help="the page server speaks CRIU's --tls with this receiver's --tls-* files: criu dump must "
                           "give --tls and a client certificate signed by --tls-ca")
    recv.add_argument("--criu-page-server-idle-timeout", type=float, default=600.0, metavar="SECONDS",
                      help="end a page-server connection silent this long; it serves one dump at a time, and criu "
                           "may be silent while it freezes a large tree (default: 600)")
    recv.add_argument("--criu-images-dir", type=Path, metavar="DIR",
                      help="where page-server sessions write pagemaps and pages: criu dump's -D on this host")
    recv.add_argument("--criu-prev-images-dir", type=Path, metavar="DIR",
                      help="parent images, like criu's --prev-images-dir (relative to --criu-images-dir)")
    recv.add_argument("--flatten", action="store_true",
                      help="fold each committed live round into one flat image per process in the background, so "
                           "that a restore reads two or three levels instead of every round (experimental)")
    recv.add_argument("--restore", action="store_true",
                      help="also restore migrated processes with criu (`pagehaul migrate`'s destination)")
    recv.add_argument("--criu", type=Path, default=None, metavar="PATH",
                      help="criu binary for --restore (default: the private CRIU 4.2.1 of scripts/install-criu.sh)")
    _criu_option_args(recv, "restore")
    recv.add_argument("--max-restore-bytes", type=_rate, default=1 << 30, metavar="SIZE",
                      help="image bytes one restore may ship (default: 1G)")
    recv.add_argument("--restore-idle-timeout", default=None, metavar="SECONDS",
                      help="with --restore: end a restore stream silent this long, freeing its session (default: 60)")
    recv.add_argument("--restore-timeout", default=None, metavar="SECONDS",
                      help="with --restore: time criu restore (and a lazy restore's fill) may take (default: 300)")
    recv.add_argument("--service-device", metavar="DEV",
                      help="with --restore: the interface that takes addresses moved with a tree (migrate "
                           "--move-address); without it such migrations are refused")
    recv.add_argument("--lazy-restore", action="store_true",
                      help="with --restore: criu restore --lazy-pages, the tree runs before its memory is all in "
                           "(this receiver fills it on fault and in the background; experimental)")
    _add_security(recv, "receiver")

    certs = sub.add_parser("certs", help="make a test CA and sender/receiver key pairs (mutual TLS)")
    certs.add_argument("--out", type=Path, required=True, help="directory for ca.crt, receiver.*, sender.*")
    certs.add_argument("--name", action="append", default=[], metavar="HOST",
                       help="extra host name or IP address for the receiver certificate (repeatable)")

    insp = sub.add_parser("inspect", help="show what an image directory (session or round) holds")
    insp.add_argument("path", type=Path, metavar="DIR")
    insp.add_argument("--json", action="store_true", help="machine-readable output")

    ver = sub.add_parser("verify", help="re-check an image set (session or round dir): every file and page digest")
    ver.add_argument("path", type=Path, metavar="DIR")
    ver.add_argument("--json", action="store_true", help="machine-readable output")

    demo = sub.add_parser("demo", help="migrate a live demo workload over loopback and verify the result, then "
                                       "move a process tree whole and restore it with CRIU")
    demo.add_argument("--size-mib", type=int, default=256, help="workload size (default: 256 MiB)")
    demo.add_argument("--images-dir", type=Path, default=None,
                      help="keep the images here (default: a temporary directory, removed afterwards)")
    demo.add_argument("--pagemap-file", action="store_true", help="force the /proc/PID/pagemap scanner")
    demo.add_argument("--tracker", default="auto", help="dirty tracker (default: auto; 'none': one frozen round)")
    demo.add_argument("--memory-only", action="store_true",
                      help="skip act two (a process tree migrated whole and restored with CRIU)")
    return parser


def _criu_option_args(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--criu-opt", action="append", default=[], metavar="OPTION",
                   help=f"pass one option to criu {command}, written as --criu-opt=--name[=value] (repeatable); "
                        "options pagehaul sets or that would break the handover are refused")
    p.add_argument("--criu-config", type=Path, default=None, metavar="FILE",
                   help=f"a CRIU configuration file for criu {command} (one option per line, no dashes)")


def _send_config(args: argparse.Namespace, *, leave_stopped: bool) -> SendConfig:
    """The SendConfig of ``send``/``migrate`` options; serves metrics if asked."""
    from pagehaul.metrics import SenderMetrics, serve_metrics
    from sender.config import SendConfig
    from sender.policy import ConvergenceLimits

    if (args.pid is None) == (args.cgroup is None) or args.to is None:
        raise ConfigError(f"{args.command} needs --to and one of --pid or --cgroup")
    if args.pid is not None and args.pid <= 0:
        raise ConfigError(f"invalid pid {args.pid}")
    if args.cgroup is not None and args.no_children:
        raise ConfigError("--no-children goes with --pid, not --cgroup")
    from sender.tree import resolve_cgroup

    cgroup = resolve_cgroup(args.cgroup) if args.cgroup is not None else None
    if args.downtime_ms <= 0 or args.max_rounds < 1:
        raise ConfigError("--downtime-ms must be positive and --max-rounds at least 1")
    security = _security(args)
    metrics = SenderMetrics()
    if args.metrics_listen:
        serve_metrics(metrics.registry, args.metrics_listen)
    return SendConfig(pid=args.pid or 0, cgroup=cgroup, children=not args.no_children, shmem=not args.no_shmem,
                      security=security, metrics=metrics, target=args.to,
                      force_pagemap_file=args.pagemap_file,
                      zstd_level=1 if args.zstd_level == "auto" else args.zstd_level,
                      adaptive_compression=args.zstd_level == "auto", bandwidth_limit_bps=args.bandwidth_limit,
                      workers=args.workers, tracker=args.tracker,
                      leave_stopped=leave_stopped, auto_converge=args.auto_converge,
                      on_no_convergence=args.on_no_convergence,
                      limits=ConvergenceLimits(downtime_target_s=args.downtime_ms / 1000, max_rounds=args.max_rounds),
                      freeze_timeout_s=args.freeze_timeout, connect_timeout_s=args.connect_timeout,
                      resume_deadline_s=args.resume_deadline)


def _run_send(args: argparse.Namespace) -> int:
    from cli.report import print_send_result, print_trackers, progress_display
    from pagehaul.tune import tune_process
    from sender.precopy import send

    if args.list_trackers:
        from sender.trackers import probe_all

        print_trackers(probe_all())
        return 0
    cfg = _send_config(args, leave_stopped=not args.resume)
    tune_process()
    with progress_display(enabled=not (args.quiet or args.json)) as progress:
        result = asyncio.run(send(cfg, progress))
    print_send_result(result, as_json=args.json)
    return 0


def _criu_path(given: Path | None) -> Path:
    from pagehaul.criu_tools import CriuTools

    if given is not None:
        return given
    tools = CriuTools.locate()
    if tools is None:
        raise ConfigError("no criu: install it with scripts/install-criu.sh or give --criu PATH")
    return tools.criu


def _run_migrate(args: argparse.Namespace) -> int:
    from cli.report import print_migrate_result, progress_display
    from pagehaul import netaddr
    from pagehaul.tune import tune_process
    from sender.migrate import MigrateConfig, migrate

    if args.restore_timeout <= 0:
        raise ConfigError("--restore-timeout must be positive")
    if args.cgroup is not None or args.no_children or args.no_shmem:
        raise ConfigError("migrate moves a whole process tree: give the root with --pid "
                          "(no --cgroup, --no-children or --no-shmem: CRIU dumps the whole tree)")
    if args.move_address and args.tcp_close:
        raise ConfigError("--move-address keeps established connections, --tcp-close closes them: give one")
    cfg = MigrateConfig(send=_send_config(args, leave_stopped=True), criu=_criu_path(args.criu),
                        dump_parent=args.dump_dir, tcp_close=args.tcp_close, shell_job=args.shell_job,
                        keep_dump=args.keep_dump, lazy_dump=not args.full_dump,
                        criu_opts=criu_opts.parse("dump", args.criu_opt, args.criu_config),
                        restore_timeout_s=args.restore_timeout,
                        move_addresses=tuple(netaddr.parse_wanted(a) for a in args.move_address))
    if args.check:
        from sender.migrate import preflight
        from sender.preflight import problems

        findings = asyncio.run(preflight(cfg))
        for f in findings:
            print(f"{f.severity:>7}  {f.line()}")
        return 2 if problems(findings) else 0
    tune_process()
    with progress_display(enabled=not (args.quiet or args.json)) as progress:
        result = asyncio.run(migrate(cfg, progress))
    print_migrate_result(result, as_json=args.json)
    return 0


def _receiver_config(args: argparse.Namespace) -> ReceiverConfig:
    """The ReceiverConfig of ``receive``'s options, every bound checked (ConfigError: one line)."""
    from pagehaul.metrics import ReceiverMetrics, serve_metrics
    from receiver.config import ReceiverConfig
    from receiver.restore import RestoreConfig
    from receiver.session import SessionLimits

    security = _security(args)
    if args.max_sessions < 1:
        raise ConfigError("--max-sessions must be at least 1")
    if not 0 < args.resume_window < float("inf"):
        raise ConfigError("--resume-window must be a positive number of seconds")
    if not 0 < args.idle_timeout < float("inf"):
        raise ConfigError("--idle-timeout must be a positive number of seconds")
    if args.service_device is not None and not args.restore:
        raise ConfigError("--service-device needs --restore")
    if args.lazy_restore and not args.restore:
        raise ConfigError("--lazy-restore needs --restore")
    max_open_files = _whole("--max-open-files", args.max_open_files, 1)
    max_hole_runs = _whole("--max-hole-runs", args.max_hole_runs, 1)
    restore_idle = _seconds("--restore-idle-timeout", args.restore_idle_timeout)
    restore_timeout = _seconds("--restore-timeout", args.restore_timeout)
    if (restore_idle is not None or restore_timeout is not None) and not args.restore:
        raise ConfigError("--restore-idle-timeout/--restore-timeout need --restore")
    metrics = ReceiverMetrics()
    if args.metrics_listen:
        serve_metrics(metrics.registry, args.metrics_listen)
    limits = SessionLimits(max_session_bytes=int(args.max_session_bytes) if args.max_session_bytes else None,
                           flatten=args.flatten)
    if max_hole_runs is not None:
        limits = dataclasses.replace(limits, max_hole_runs=max_hole_runs)
    restore = None
    if args.restore:
        defaults = RestoreConfig(Path())
        restore = RestoreConfig(_criu_path(args.criu), max_bytes=int(args.max_restore_bytes),
                                timeout_s=defaults.timeout_s if restore_timeout is None else restore_timeout,
                                idle_timeout_s=defaults.idle_timeout_s if restore_idle is None else restore_idle,
                                criu_opts=criu_opts.parse("restore", args.criu_opt, args.criu_config),
                                service_device=args.service_device, lazy=args.lazy_restore)
    return ReceiverConfig(images_dir=args.images_dir, listen=args.listen, security=security, metrics=metrics,
                          limits=limits,
                          max_total_bytes=int(args.max_total_bytes) if args.max_total_bytes else None,
                          max_sessions=args.max_sessions, resume_window_s=args.resume_window,
                          idle_timeout_s=args.idle_timeout, max_open_files=max_open_files, restore=restore)


def _run_receive(args: argparse.Namespace) -> int:
    from pagehaul.tune import tune_process
    from receiver.grpc_server import serve

    config = _receiver_config(args)
    security = config.security
    tune_process()
    if args.criu_page_server is None:
        if args.criu_images_dir or args.criu_prev_images_dir or args.criu_page_server_tls:
            raise ConfigError("--criu-images-dir/--criu-prev-images-dir/--criu-page-server-tls need --criu-page-server")
        asyncio.run(serve(config))
    else:
        if args.criu_images_dir is None:
            raise ConfigError("--criu-page-server needs --criu-images-dir (criu dump's -D on this host)")
        if args.criu_page_server_tls and security.tls is None:
            raise ConfigError("--criu-page-server-tls needs --tls-cert, --tls-key and --tls-ca")
        if not args.criu_page_server_tls and not _is_loopback(args.criu_page_server):
            log.warning("the CRIU page server on %s takes any writer: CRIU's protocol has no authentication%s; "
                        "listen on 127.0.0.1 (criu dump on this host) or on a private link, or give "
                        "--criu-page-server-tls", args.criu_page_server,
                        " (unlike this receiver's mutual TLS)" if security.tls is not None else "")
        if args.criu_page_server_idle_timeout <= 0:
            raise ConfigError("--criu-page-server-idle-timeout must be positive")
        asyncio.run(_serve_with_page_server(config, args.criu_images_dir, args.criu_page_server,
                                            args.criu_prev_images_dir, args.criu_page_server_idle_timeout,
                                            tls=security.tls if args.criu_page_server_tls else None))
    return 0


def _is_loopback(host_port: str) -> bool:
    host = host_port.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _serve_with_page_server(config: ReceiverConfig, criu_dir: Path, criu_listen: str,
                                  criu_parent: Path | None, idle_timeout_s: float, *,
                                  tls: TlsFiles | None) -> None:
    """The gRPC receiver owns SIGTERM/SIGINT; the page server starts first and stops with it."""
    from receiver.grpc_server import serve
    from receiver.pageserver import PageServerLimits, serve_page_server

    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    page_server = asyncio.create_task(serve_page_server(criu_dir, criu_listen, criu_parent, ready=ready,
                                                        limits=PageServerLimits(idle_timeout_s=idle_timeout_s),
                                                        handle_signals=False, tls=tls))
    waiters: list[asyncio.Future[object]] = [ready, page_server]  # type: ignore[list-item]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if page_server.done():
        page_server.result()  # start-up failure: ConfigError (parent) / PagehaulError (cannot listen)
    try:
        await serve(config)
    finally:
        page_server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await page_server


def _run_certs(args: argparse.Namespace) -> int:
    from pagehaul.security import make_test_pki

    for path in make_test_pki(args.out, args.name):
        print(path)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from cli.inspect import inspect

    if not args.path.is_dir():
        raise ConfigError(f"{args.path} is not a directory")
    return inspect(args.path, as_json=args.json)


def _run_verify(args: argparse.Namespace) -> int:
    from pagehaul.integrity import main_verify

    return main_verify(args.path, as_json=args.json)


def _run_demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    if args.size_mib < 1:
        raise ConfigError("--size-mib must be at least 1")
    return run_demo(args.size_mib, args.images_dir, force_pagemap_file=args.pagemap_file, tracker=args.tracker,
                    full=not args.memory_only)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    handlers = {"send": _run_send, "migrate": _run_migrate, "receive": _run_receive, "certs": _run_certs,
                "inspect": _run_inspect, "verify": _run_verify, "demo": _run_demo}
    try:
        return handlers[args.command](args)
    except PagehaulError as err:
        print(f"pagehaul: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("pagehaul: interrupted", file=sys.stderr)
        return 130
