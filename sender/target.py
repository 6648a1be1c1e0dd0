"""The target of a migration: its processes and the shared memory they map, found again each round.

A target is a process and its descendants (``SendConfig.children``), or every process of a
cgroup v2 (``SendConfig.cgroup``). Each round has one memory image per process (CRIU's
``pagemap-<vpid>.img``) and one per shared-memory object mapped by any of them
(``pagemap-shmem-<shmid>.img``, read once through the object's file, see ``sender.shmem``).
Processes found between rounds start with a full image; processes gone are dropped.

This module owns which images exist now (``Target.scan``), their dirty trackers and which of
their pages changed since the last collect (``Target.collect_live``, ``Target.collect_frozen``);
which pages a round sends is ``sender.rounds``'s question.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pagehaul import procfs
from pagehaul.codec import ImageKey
from pagehaul.errors import AccessDenied, ConfigError, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import U64, Runs
from sender.config import SendConfig
from sender.memreader import MemoryReader
from sender.scanner import PageScanner, make_scanner
from sender.shmem import ShmMapping, ShmObject, group_by_object, open_object, shared_mappings
from sender.trackers import select_tracker
from sender.trackers.base import DirtyTracker, PageReader, SentRecorder
from sender.trackers.hashing import HashTracker
from sender.trackers.uffd import UffdWpTracker
from sender.tree import TargetSpec, TreeFreezer, discover

log = logging.getLogger(__name__)

# Per image: the pages written since the last collect; None when not tracked yet (sent whole).
DirtySets = dict[ImageKey, Runs | None]


def target_spec(cfg: SendConfig) -> TargetSpec:
    return TargetSpec(pid=cfg.pid, cgroup=cfg.cgroup, children=cfg.children)


class TargetProcess:
    """One process of the target: its scanner, reader and dirty tracker."""

    def __init__(self, pid: int, cfg: SendConfig, *, essential: bool, with_tracker: bool) -> None:
        self.pid = pid
        self.essential = essential
        self.start_time = procfs.read_start_time(pid)
        # Not in a round yet: its first image is whole, whatever an earlier process with the same
        # vpid left in the previous round.
        self.sent = False
        self.vpid = procfs.read_vpid(pid)
        self.key = ImageKey("pid", self.vpid)
        self.scanner: PageScanner = make_scanner(pid, force_pagemap_file=cfg.force_pagemap_file)
        self.reader: MemoryReader | None = None
        self.tracker: DirtyTracker | None = None
        self.armed = False
        try:
            self.reader = MemoryReader(pid)
            if with_tracker:
                self.tracker = select_tracker(cfg.tracker, pid, self.scanner)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.reader is not None:
            self.reader.close()
        self.scanner.close()


class TargetShm:
    """One shared-memory object mapped by the target, tracked by hashing its pages."""

    def __init__(self, obj: ShmObject, tracked: bool) -> None:
        self.obj = obj
        self.key = ImageKey("shmem", obj.shmid)
        self.tracker = HashTracker(obj.shmid, scanner=obj, reader=obj) if tracked else None
        self.armed = False
        self.sent = False

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        self.obj.close()


@dataclass(slots=True)
class ImageScan:
    """One image as scanned now: its VMAs (byte ranges for shared memory) and present pages."""

    key: ImageKey
    pid: int
    vmas: list[procfs.Vma]
    present: Runs
    source: PageReader
    tracker: DirtyTracker | None
    recorder: SentRecorder | None
    essential: bool
    armed: bool
    # Never sent before: no parent image of its own (the previous round's image with this key, if
    # any, belonged to another process or object).
    fresh: bool


class Target:
    """The processes being migrated and the shared memory they map, found again each round."""

    def __init__(self, cfg: SendConfig, spec: TargetSpec) -> None:
        self.cfg = cfg
        self.spec = spec
        self.precopy = cfg.tracker != "none"
        self.procs: dict[int, TargetProcess] = {}
        self.shms: dict[int, TargetShm] = {}
        self.tracker_name = "none"
        self.scanner_name = ""

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()
        for shm in self.shms.values():
            shm.close()
        self.procs.clear()
        self.shms.clear()

    def refresh(self, pids: list[int] | None = None, *, with_tracker: bool = True) -> list[int]:
        """Take the target's processes now (or ``pids``): new ones are opened, gone ones dropped.
        Returns the new pids."""
        current = discover(self.spec) if pids is None else pids
        for pid in [p for p in self.procs if p not in current or self._reused(p)]:
            log.info("process left the target pid=%d", pid)
            self.procs.pop(pid).close()
        new = []
        for pid in current:
            if pid in self.procs:
                continue
            try:
                proc = TargetProcess(pid, self.cfg, essential=pid == self.spec.pid,
                                     with_tracker=with_tracker and self.precopy)
            except ProcessGone:
                if pid == self.spec.pid:
                    raise
                continue
            self.procs[pid] = proc
            new.append(pid)
            self.scanner_name = self.scanner_name or type(proc.scanner).__name__
            if proc.tracker is not None:
                self.tracker_name = proc.tracker.name
        if not self.procs:
            raise ProcessGone(self.spec.pid, "no process of the target is left")
        return new

    def _reused(self, pid: int) -> bool:
        """The pid now names another process (the one we had exited, and the pid was reused)."""
        try:
            return procfs.read_start_time(pid) != self.procs[pid].start_time
        except ProcessGone:
            return True

    def mark_sent(self) -> None:
        """Every process and object now has an image in the latest round."""
        for proc in self.procs.values():
            proc.sent = True
        for shm in self.shms.values():
            shm.sent = True

    def start_tracking(self, freezer: TreeFreezer) -> list[ImageScan]:
        """Before the first live round: every process found now gets its tracker started, and the
        images to send whole are scanned.

        Each process is stopped on its own while its tracker starts (uffd-wp injects a system call,
        which a cgroup-frozen process would never run); one that forks meanwhile is found by the
        next refresh and sent whole then."""
        self.refresh()
        self._arm(freezer)
        return self._arm_shmem(self.scan())

    def collect_live(self, freezer: TreeFreezer) -> tuple[list[ImageScan], DirtySets]:
        """Between live rounds: new processes are armed (they go whole), gone ones dropped; then every
        image is scanned and its dirty set collected, frozen if a tracker needs it (soft-dirty)."""
        new = self.refresh()
        if new:
            log.info("processes joined the target pids=%s", new)
            self._arm(freezer)
        if not self._needs_freeze:
            return self._collect(self._arm_shmem(self.scan()))
        freezer.freeze()
        try:
            return self._collect(self._arm_shmem(self.scan()))
        finally:
            freezer.thaw()

    def collect_frozen(self, pids: list[int]) -> tuple[list[ImageScan], DirtySets]:
        """With the target frozen as ``pids``: processes born since the last collect are taken (sent
        whole), every image scanned and its dirty set collected."""
        self.refresh(pids, with_tracker=False)
        return self._collect(self.scan())

    def after_final(self) -> AfterFinal:
        """The stopped target handed on after the final round, trackers still open."""
        return AfterFinal(self)

    def _arm(self, freezer: TreeFreezer) -> None:
        """Start the tracker of every process not tracked yet, before its pages are read; the target
        must not be frozen by the cgroup freezer (see ``start_tracking``)."""
        for pid, proc in list(self.procs.items()):
            if proc.tracker is None or proc.armed:
                continue
            try:
                vmas = procfs.select_dumpable(procfs.read_maps(pid))
                with freezer.holding(pid) as held:
                    proc.tracker.start(vmas, held)
            except ProcessGone:
                if proc.essential:
                    raise
                self.procs.pop(pid).close()
                continue
            proc.armed = True

    def scan(self) -> list[ImageScan]:
        """Every image now: processes ascending by pid, then shared-memory objects by shmid."""
        out: list[ImageScan] = []
        mappings: list[ShmMapping] = []
        for pid, proc in list(self.procs.items()):
            try:
                entries = procfs.read_maps(pid)
                vmas = procfs.select_dumpable(entries)
                present = proc.scanner.scan(vmas)
            except ProcessGone:
                if proc.essential:
                    raise
                log.info("process left the target pid=%d", pid)
                self.procs.pop(pid).close()
                continue
            if not vmas:  # a zombie, or a process that is exiting: nothing to dump
                continue
            assert proc.reader is not None
            recorder = proc.tracker if isinstance(proc.tracker, SentRecorder) else None
            out.append(ImageScan(proc.key, pid, vmas, present, proc.reader, proc.tracker, recorder, proc.essential,
                                 proc.armed, not proc.sent))
            if self.cfg.shmem:
                mappings.extend(shared_mappings(pid, entries))
        if not out:
            raise ProcessGone(self.spec.pid, "no process of the target is left")
        keys = [s.key for s in out]
        if len(set(keys)) != len(keys):
            raise ConfigError("two processes of the target have the same pid in their namespaces; "
                              "CRIU image names would clash")
        groups = group_by_object(mappings)
        for shmid in [i for i in self.shms if i not in groups]:
            self.shms.pop(shmid).close()
        for shmid in sorted(groups):
            shm = self.shms.get(shmid)
            if shm is None:
                try:
                    shm = TargetShm(open_object(shmid, groups[shmid], PAGE_SIZE), tracked=self.precopy)
                except (ProcessGone, AccessDenied) as err:
                    log.warning("shared memory %d not readable, skipped: %s", shmid, err)
                    continue
                self.shms[shmid] = shm
            shm.obj.set_mappings(groups[shmid])
            vmas = shm.obj.vmas()
            if not vmas:
                continue
            out.append(ImageScan(shm.key, shm.obj.mapper, vmas, shm.obj.scan(vmas), shm.obj, shm.tracker,
                                 shm.tracker, False, shm.armed, not shm.sent))
        return out

    def _arm_shmem(self, scans: list[ImageScan]) -> list[ImageScan]:
        """Hash new shared-memory objects once (their first round is full anyway)."""
        for s in scans:
            if s.key.kind != "shmem" or s.tracker is None or s.armed:
                continue
            shm = self.shms[s.key.id]
            shm.tracker.start(s.vmas, None)  # type: ignore[union-attr, arg-type]  # the hash tracker needs no freezer
            shm.armed = s.armed = True
        return scans

    def _collect(self, scans: list[ImageScan]) -> tuple[list[ImageScan], DirtySets]:
        """The images still there and the dirty set of each (None: not tracked yet, send it whole)."""
        kept: list[ImageScan] = []
        dirty: DirtySets = {}
        for s in scans:
            if s.tracker is None or not s.armed:
                dirty[s.key] = None
                kept.append(s)
                continue
            try:
                dirty[s.key] = s.tracker.collect(s.vmas, s.present)
            except ProcessGone:
                if s.essential:
                    raise
                log.info("process left the target pid=%d", s.pid)  # dropped from this round on
                gone = self.procs.pop(s.pid, None)
                if gone is not None:
                    gone.close()
                continue
            kept.append(s)
        return kept, dirty

    @property
    def _needs_freeze(self) -> bool:
        return any(p.tracker is not None and p.tracker.needs_freeze for p in self.procs.values())


class AfterFinal:
    """The stopped target after the final round, trackers still armed (SendConfig.keep_target)."""

    def __init__(self, target: Target) -> None:
        self._target = target

    @property
    def vouches(self) -> bool:
        """Every process has a kernel tracker (uffd-wp, soft-dirty) that can say, without reading
        memory, which pages were written since the final round."""
        return all(p.tracker is not None and p.armed and not isinstance(p.tracker, HashTracker)
                   for p in self._target.procs.values())

    def before_dump(self) -> None:
        """Keep tracking only what a lazy dump leaves in the source (private anonymous memory):
        uffd-wp markers on the rest would read as swapped pages to CRIU (UffdWpTracker.release)."""
        for s in self._target.scan():
            if s.key.kind == "pid" and isinstance(s.tracker, UffdWpTracker):
                s.tracker.release([v for v in s.vmas if v.kind == procfs.VmaKind.FILE_PRIVATE])

    def written(self) -> dict[ImageKey, U64]:
        """Per process image, the page addresses written since the final round's collect
        (``vouches`` must be true; shared memory is not asked)."""
        out: dict[ImageKey, U64] = {}
        for s in self._target.scan():
            if s.key.kind != "pid":
                continue
            if s.tracker is None or not s.armed:
                raise RuntimeError(f"{s.key.pagemap_name}: no tracker to say what was written")
            out[s.key] = np.unique(s.tracker.collect(s.vmas, s.present).page_addrs(PAGE_SIZE))
        return out

    def close(self) -> None:
        self._target.close()
