"""Full migration, source side: pre-copy with pagehaul, the rest of the process with CRIU.

    1. pre-copy rounds and the final frozen round (``sender.precopy.send``), which reads the
       memory only once every thread is in group-stop and leaves the tree so (no instruction
       runs and no signal is delivered in between; ``sender.freezer``), keeping the digest of
       every page the receiver holds;
    2. ``criu dump --leave-stopped`` into a local directory (tmpfs by default): CRIU seizes the
       stopped tree and writes every image, memory included, without crossing the network;
    3. ``sender.reduce.reduce_dump`` compares every page CRIU dumped with what the receiver
       holds and ships only the pages it does not hold exactly (in practice the vDSO and a text
       page CRIU's parasite touched);
    4. the remaining images go to the receiver over the Restore RPC, which assembles them on top of
       the session's rounds and runs ``criu restore``;
    5. only when the receiver answers that the tree runs there is the source killed. Any failure
       before that sends SIGCONT to the source tree: it keeps running where it was.

Downtime, from the end of the final freeze to the answer, is reported in parts (``Downtime``),
and the migration's phases (``sender.phases``: pre-copy, frozen, committed, CRIU dump, shipping,
restoring, running or failed) with their times.
Why not let CRIU send memory: without soft-dirty (this kernel), ``criu dump`` can only copy all
memory while frozen; locally that costs a memory copy into tmpfs (~0.5 s per GiB here), over the
network it costs the whole transfer. Why not stop CRIU from dumping memory at all: CRIU 4.2 has no
such option (``--lazy-pages`` keeps the tree frozen until a lazy-pages daemon has pulled every page).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import numpy as np

from pagehaul import netaddr, procfs
from pagehaul.codec import ImageKey
from pagehaul.criu_opts import CriuOptions
from pagehaul.criu_pageserver import PAGE_SERVER_IOV, PS_IOV_CLOSE, STATUS_OK, STATUS_REPLY
from pagehaul.criu_tools import run_criu
from pagehaul.errors import ConfigError, ImageError, PagehaulError, RestoreUnknown
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import U64, Runs
from pagehaul.transport import RestoreChannel
from pagehaul.v1 import restore_pb2 as rpb
from sender import tcp_repair
from sender.config import ProgressFn, SendConfig, SendResult
from sender.grpc_channel import restore_channel
from sender.memreader import MemoryReader
from sender.phases import Phase, Phases, PhaseTime
from sender.precopy import send
from sender.preflight import Finding, check_addresses, check_receiver, check_tree, problems
from sender.reduce import Holding, Reduced, fill_lazy, iter_chunks, reduce_dump
from sender.rounds import Held

log = logging.getLogger(__name__)

DUMP_LOG: Final = "dump.log"
CRIU_OUT: Final = "criu.out"  # criu's own stdout and stderr (what it says before its log is open)


@dataclass(frozen=True, slots=True)
class MigrateConfig:
    send: SendConfig
    criu: Path
    # Parent of the local dump directory: tmpfs (/dev/shm) by default, so the dump costs a memory copy.
    dump_parent: Path | None = None
    # Dump established TCP connections closed, restore them closed (their peers reconnect).
    tcp_close: bool = False
    # A process started from a terminal: its session or tty lies outside the tree (criu --shell-job).
    shell_job: bool = False
    restore_timeout_s: float = 300.0
    criu_timeout_s: float = 300.0
    keep_dump: bool = False
    # CRIU's own options for criu dump (--criu-opt, --criu-config), validated.
    criu_opts: CriuOptions = field(default_factory=CriuOptions)
    # criu dump --lazy-pages when the trackers can say what was written after the final round:
    # CRIU then copies no private anonymous memory (its dump time no longer grows with it).
    lazy_dump: bool = True
    # IPv4 addresses that move with the tree (--move-address): removed here at the frozen point,
    # added on the destination; established TCP connections are kept (pagehaul.netaddr).
    move_addresses: tuple[netaddr.Wanted, ...] = ()

    @property
    def tcp_established(self) -> bool:
        """Established TCP connections are dumped open (criu --tcp-established)."""
        return bool(self.move_addresses) or self.criu_opts.has("tcp-established")


@dataclass(slots=True)
class Downtime:
    """Parts of the downtime in µs: from the end of the final freeze to the restored tree running."""

    final_round_us: int = 0
    criu_dump_us: int = 0
    reduce_us: int = 0
    ship_us: int = 0
    assemble_us: int = 0
    restore_us: int = 0
    total_us: int = 0
    # Lazy restore: from the restored tree continued to its last page in. Not downtime (the tree
    # runs meanwhile) and not in total_us; the source is killed only after it.
    lazy_fill_us: int = 0


@dataclass(slots=True)
class MigrateResult:
    send: SendResult
    downtime: Downtime = field(default_factory=Downtime)
    restored_pid: int = 0
    images_dir: str = ""
    shipped_bytes: int = 0
    shipped_files: int = 0
    extra_pages: int = 0
    dropped_pages: int = 0
    # Pages the receiver held with other bytes than CRIU dumped (shipped from CRIU's dump), and
    # the first few of them ("PAGEMAP-NAME 0xADDR"). The kernel rewrites a thread's rseq area
    # (cpu_id) when CRIU's parasite runs it on another CPU; anything else would be news.
    changed_pages: int = 0
    changed_at: list[str] = field(default_factory=list)
    tasks: int = 0
    dump_dir: str = ""  # criu's local dump, when kept (--keep-dump)
    dump_error: str = ""  # why the kept dump is incomplete, if it is (the migration itself succeeded)
    moved_addresses: list[str] = field(default_factory=list)  # ADDR/PREFIXLEN now on the destination
    lazy_dump: bool = False  # criu dumped with --lazy-pages (module doc)
    # Every phase of the migration, the send's included (sender.phases).
    phases: list[PhaseTime] = field(default_factory=list)
    # The receiver restored lazily (receive --lazy-restore): pages its lazy-pages daemon put in,
    # how many after the tree was continued, and the faults it answered.
    lazy_pages: int = 0
    lazy_after_resume_pages: int = 0
    lazy_faults: int = 0


async def preflight(cfg: MigrateConfig) -> list[Finding]:
    """Every check of ``sender.preflight`` for this migration: the tree, criu, the receiver."""
    check_criu(cfg.criu)
    pids = procfs.process_tree(cfg.send.pid)
    findings = check_tree(pids, tcp_close=cfg.tcp_close, shell_job=cfg.shell_job, dump_parent=_dump_parent(cfg),
                          lazy=cfg.lazy_dump, tcp_established=cfg.tcp_established,
                          moved=frozenset(w.address for w in cfg.move_addresses))
    findings += check_addresses(cfg.send.pid, cfg.move_addresses)
    findings.append(await check_receiver(cfg.send.target, cfg.send.security, cfg.send.connect_timeout_s))
    return findings


def check_criu(criu: Path) -> None:
    """Fail before touching the process if criu cannot run at all."""
    try:
        proc = subprocess.run([str(criu), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"cannot run criu at {criu}: {err}; install it with scripts/install-criu.sh") from err
    if proc.returncode != 0:
        raise ConfigError(f"{criu} --version failed: {(proc.stderr or proc.stdout).strip()[:200]}")


async def _criu_dump(cfg: MigrateConfig, pid: int, into: Path, *, lazy: bool) -> None:
    """``criu dump --leave-stopped`` of the stopped tree into ``into``.

    ``lazy``: ``--lazy-pages``, so that CRIU copies no private anonymous memory (it marks those
    pages PE_LAZY and would serve them from the source); its page server gets one end of a socket
    pair (``--ps-socket``), and once ``--status-fd`` says the images are written it is told to
    close (PS_IOV_CLOSE): pagehaul holds those pages already. CRIU then cures its parasite and
    leaves the tree stopped, as a plain dump does.
    """
    argv = [str(cfg.criu), "dump", "-t", str(pid), "-D", str(into), "--leave-stopped", "-o", DUMP_LOG, "-v4",
            *cfg.criu_opts.argv()]
    if cfg.tcp_close:
        argv.append("--tcp-close")
    if cfg.move_addresses:
        # Removing the addresses is the network lock (pagehaul.netaddr): no iptables or nftables.
        if not cfg.criu_opts.has("tcp-established"):
            argv.append("--tcp-established")
        if not cfg.criu_opts.has("network-lock"):
            argv.append("--network-lock=skip")
    if cfg.shell_job:
        argv.append("--shell-job")
    with open(into / CRIU_OUT, "wb") as out:  # noqa: ASYNC230 -- creating an empty local file
        await _run_dump(cfg, argv, into, out, lazy=lazy)


async def _run_dump(cfg: MigrateConfig, argv: list[str], into: Path, out: IO[bytes], *, lazy: bool) -> None:
    if not lazy:
        await run_criu(argv, log=into / DUMP_LOG, timeout_s=cfg.criu_timeout_s, hint=_hint, out=out)
        return
    # Sockets, not a pipe, for the status too: closing them twice is harmless.
    ours, theirs = socket.socketpair()
    status_ours, status_theirs = socket.socketpair()
    argv += ["--lazy-pages", "--ps-socket", str(theirs.fileno()), "--status-fd", str(status_theirs.fileno())]

    async def close_page_server() -> None:
        # criu has its copies now: with ours closed, end of file means criu exited.
        theirs.close()
        status_theirs.close()
        if await asyncio.to_thread(status_ours.recv, 1) != b"\0":
            return  # criu failed before its page server started: its exit code says why
        ours.sendall(PAGE_SERVER_IOV.pack(PS_IOV_CLOSE, 0, 0, 0))
        reply = await asyncio.to_thread(ours.recv, STATUS_REPLY.size, socket.MSG_WAITALL)
        if len(reply) != STATUS_REPLY.size or STATUS_REPLY.unpack(reply)[0] != STATUS_OK:
            log.warning("criu's lazy page server did not confirm the close: %r", reply)

    try:
        await run_criu(argv, log=into / DUMP_LOG, timeout_s=cfg.criu_timeout_s, hint=_hint, out=out,
                       pass_fds=(theirs.fileno(), status_theirs.fileno()), while_running=close_page_server)
    finally:
        for sk in (ours, theirs, status_ours, status_theirs):
            sk.close()


def _hint(reason: str) -> str:
    """What the user can do about a criu dump failure we recognise."""
    low = reason.lower()
    if "tcp" in low:
        return ("; use --tcp-close to dump it with its connections closed, or --move-address to keep them "
                "(the address moves with the tree)")
    if "outside of its pid namespace" in low:
        return "; start the tree's session leader inside its PID namespace (e.g. unshare --pid --fork setsid ...)"
    if "tty" in low or "shell" in low or "session" in low:
        return "; a process started from a terminal needs --shell-job"
    return ""


async def _requests(cfg: MigrateConfig, session_id: str, tasks: list[tuple[int, int]], reduced: Reduced,
                    addresses: list[str], *, phases: Phases) -> AsyncIterator[rpb.RestoreRequest]:
    yield rpb.RestoreRequest(begin=rpb.RestoreBegin(
        session_id=session_id, tasks=[rpb.TaskPid(host_pid=h, vpid=v) for h, v in tasks], tcp_close=cfg.tcp_close,
        shell_job=cfg.shell_job, total_bytes=reduced.total_bytes, tcp_established=cfg.tcp_established,
        addresses=addresses))
    for path in reduced.files:
        for data, last in iter_chunks(path):
            yield rpb.RestoreRequest(file_chunk=rpb.FileChunk(name=path.name, data=data, last=last))
    # Entered before the receiver can have the end: its reply (the tree runs) comes after.
    phases.enter(Phase.RESTORING)
    yield rpb.RestoreRequest(end=rpb.RestoreEnd())


async def _ship(cfg: MigrateConfig, session_id: str, tasks: list[tuple[int, int]], reduced: Reduced,
                addresses: list[str], *, phases: Phases) -> rpb.RestoreReply:
    send = cfg.send
    channel: RestoreChannel
    async with restore_channel(send.target, send.connect_timeout_s, send.security) as channel:
        return await channel.restore(_requests(cfg, session_id, tasks, reduced, addresses, phases=phases),
                                     cfg.restore_timeout_s)


class _SourceReader:
    """Pages of the stopped source, for ``reduce_dump`` (lazy pages written since the final round)."""

    def __init__(self, vpid_of: dict[int, int]) -> None:
        self._host_of = {f"pagemap-{v}.img": p for p, v in vpid_of.items()}
        self._readers: dict[str, MemoryReader] = {}

    def read(self, name: str, runs: Runs) -> bytes:
        reader = self._readers.get(name)
        if reader is None:
            if name not in self._host_of:
                raise ImageError(f"{name}: lazy pages of a process that is not in the tree")
            reader = self._readers[name] = MemoryReader(self._host_of[name])
        out = bytearray(runs.total_pages * PAGE_SIZE)
        reader.read(runs, out, PAGE_SIZE)
        return bytes(out)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _holdings(held: dict[ImageKey, Held], vpid_of: dict[int, int], written: dict[ImageKey, U64]) -> dict[str, Holding]:
    """What the receiver holds, by CRIU pagemap name, for ``reduce_dump``, with what was written
    since the final round (after a lazy dump). An absent page restores as zero in anonymous
    memory and in shared-memory objects, not in private file mappings."""
    host_of = {v: p for p, v in vpid_of.items()}
    out: dict[str, Holding] = {}
    for key, h in held.items():
        if h.digests is None:
            raise RuntimeError(f"no page digests kept for {key.pagemap_name}")
        if key.kind == "shmem":
            zero_ranges: tuple[tuple[int, int], ...] = ((0, 1 << 63),)
        else:
            if key.id not in host_of:
                raise ImageError(f"process {key.id} (pid in its namespace) was migrated but is not in the tree now")
            vmas = procfs.select_dumpable(procfs.read_maps(host_of[key.id]))
            zero_ranges = tuple((v.start, v.end) for v in vmas if v.kind != procfs.VmaKind.FILE_PRIVATE)
        empty = np.zeros(0, np.uint64)
        out[key.pagemap_name] = Holding(h.cover, h.digests, h.zero, zero_ranges, written.get(key, empty))
    return out


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _dump_parent(cfg: MigrateConfig) -> Path:
    if cfg.dump_parent is not None:
        return cfg.dump_parent
    shm = Path("/dev/shm")  # noqa: S108 -- a private mkdtemp inside it, mode 0700
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


async def migrate(cfg: MigrateConfig, progress: ProgressFn | None = None) -> MigrateResult:
    """Migrate ``cfg.send.pid`` whole: memory with pagehaul, the rest with CRIU, restored on the receiver.

    The source is killed only after the receiver reports the restored tree running; on any error
    it is sent SIGCONT and keeps running here.
    """
    phases = Phases(cfg.send.metrics)
    with phases.failing():
        return await _migrate(cfg, phases, progress)


async def _migrate(cfg: MigrateConfig, phases: Phases, progress: ProgressFn | None) -> MigrateResult:
    pid = cfg.send.pid
    procfs.read_status(pid)  # ProcessGone / AccessDenied, before anything else
    found = problems(await preflight(cfg))
    if found:
        raise ConfigError(f"cannot migrate process {pid}: " + "; ".join(f.line() for f in found) +
                          " (pagehaul migrate --check lists every check)")
    sent = await send(dataclasses.replace(cfg.send, leave_stopped=True, keep_digests=True, keep_stop_guard=True,
                                          keep_target=cfg.lazy_dump), progress, phases=phases)
    after = sent.after_final
    lazy = after is not None and after.vouches
    result = MigrateResult(send=sent)
    down = result.downtime
    frozen_at_ns = phases.entered_ns(Phase.FROZEN)  # a successful send() always ends with the final freeze
    down.final_round_us = (time.monotonic_ns() - frozen_at_ns) // 1000
    pids = procfs.process_tree(pid)
    work: Path | None = None
    source: _SourceReader | None = None
    released: netaddr.Released | None = None
    connections: list[tcp_repair.HeldSocket] = []
    unknown = False
    try:
        # The tree has been stopped since the final round: its mappings are the ones pagehaul
        # dumped (read before criu touches the processes).
        tasks = [(p, procfs.read_vpid(p)) for p in pids]
        result.tasks = len(tasks)
        work = Path(tempfile.mkdtemp(prefix="pagehaul-dump-", dir=_dump_parent(cfg)))
        dump_dir, ship_dir = work / "dump", work / "ship"
        dump_dir.mkdir()
        t0 = phases.enter(Phase.CRIU_DUMP)
        if after is not None:
            if lazy:
                after.before_dump()
            else:
                after.close()  # nothing to ask it: CRIU copies all memory
        if cfg.tcp_established:
            connections = tcp_repair.connected(pids)  # to resume them if the destination fails
        if cfg.move_addresses:
            released = netaddr.release(cfg.move_addresses)
        await _criu_dump(cfg, pid, dump_dir, lazy=lazy)
        t1 = time.monotonic_ns()
        written = after.written() if lazy and after is not None else {}
        holdings = _holdings(sent.holdings, dict(tasks), written)
        source = _SourceReader(dict(tasks))
        reduced = await asyncio.to_thread(reduce_dump, dump_dir, holdings, ship_dir, PAGE_SIZE, source.read)
        t2 = phases.enter(Phase.SHIPPING)
        result.lazy_dump = lazy
        result.shipped_files, result.shipped_bytes = len(reduced.files), reduced.total_bytes
        result.extra_pages, result.dropped_pages = reduced.extra_pages, reduced.dropped_pages
        result.changed_pages, result.changed_at = reduced.changed_pages, list(reduced.changed_at)
        log.info("criu dump done: %d files, %d bytes to ship, %d pages from criu's dump (%d changed since "
                 "pagehaul read them), %d pages proven already moved", result.shipped_files, result.shipped_bytes,
                 reduced.extra_pages, reduced.changed_pages, reduced.dropped_pages)
        if reduced.changed_pages:
            log.info("%d page(s) changed between pagehaul's final round and criu's dump (sent from criu's dump): %s",
                     reduced.changed_pages, ", ".join(reduced.changed_at))
        moved = [h.interface.with_prefixlen for h in released.held] if released is not None else []
        reply = await _ship(cfg, sent.session_id, tasks, reduced, moved, phases=phases)
        t3 = time.monotonic_ns()
        down.criu_dump_us, down.reduce_us = (t1 - t0) // 1000, (t2 - t1) // 1000
        down.assemble_us, down.restore_us = reply.assemble_us, reply.restore_us
        down.lazy_fill_us = reply.lazy_fill_us
        down.ship_us = max(0, (t3 - t2) // 1000 - reply.assemble_us - reply.restore_us - reply.lazy_fill_us)
        down.total_us = (t3 - frozen_at_ns) // 1000 - reply.lazy_fill_us
        result.lazy_pages, result.lazy_faults = reply.lazy_pages, reply.lazy_faults
        result.lazy_after_resume_pages = reply.lazy_after_resume_pages
        result.restored_pid, result.images_dir = reply.root_pid, reply.images_dir
        result.moved_addresses = moved
        # The destination runs the tree from here on: nothing that fails later may continue the
        # source as well (below); whatever failed before this line, it is continued.
        phases.enter(Phase.RUNNING)
        if lazy and cfg.keep_dump:
            # The source is still stopped: the kept dump gets the pages CRIU left in it.
            try:
                filled = await asyncio.to_thread(fill_lazy, dump_dir, source.read, PAGE_SIZE)
                log.info("kept dump completed with %d lazy pages read from the stopped source", filled)
            except (OSError, PagehaulError) as err:
                result.dump_error = f"kept dump lacks the lazy pages: {err}"
                log.warning("%s", result.dump_error)
    except RestoreUnknown as err:
        unknown = True
        raise RestoreUnknown(
            f"{err}. The source is left stopped (pid {pid}, {len(pids)} task(s)) so that the tree never runs "
            f"twice: if it runs on the destination, kill the source (kill -KILL {' '.join(map(str, pids))}); "
            f"if not, continue it (kill -CONT {' '.join(map(str, pids))})") from err
    finally:
        ok = phases.current is Phase.RUNNING
        if source is not None:
            source.close()
        if ok:
            _signal_all(pids, signal.SIGKILL)  # the destination runs it now
            log.info("source killed pid=%d tasks=%d; restored as pid %d on the destination", pid, len(pids),
                     result.restored_pid)
        elif unknown:
            # Neither continued nor killed, its address not taken back: a person decides (the error says how).
            log.error("restore outcome unknown; source pid=%d left stopped", pid)
        else:
            # Connections, then addresses, then the processes: the source serves again as it was.
            tcp_repair.resume(connections)
            if released is not None:
                with contextlib.suppress(netaddr.AddressError):  # logged; the source must go on anyway
                    released.give_back()
            _signal_all(pids, signal.SIGCONT)  # never leave the source stopped because of an error
            log.warning("migration failed after the final round; source pid=%d continued", pid)
        if after is not None:
            after.close()
        if sent.stop_guard is not None:
            sent.stop_guard.disarm()  # done with the stop either way
        if work is not None:
            _clean(work, ok=ok, keep=cfg.keep_dump)
            if cfg.keep_dump:
                result.dump_dir = str(work / "dump")
    result.phases = phases.history()
    return result


def _clean(work: Path, *, ok: bool, keep: bool) -> None:
    """Remove the local dump (it holds a copy of all memory); after a failure keep criu's log."""
    if keep:
        log.info("criu dump kept at %s", work)
        return
    if ok:
        shutil.rmtree(work, ignore_errors=True)
        return
    for path in sorted(work.rglob("*"), reverse=True):
        if path.name not in (DUMP_LOG, CRIU_OUT):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
    log.info("criu's dump log kept at %s", work / "dump" / DUMP_LOG)
