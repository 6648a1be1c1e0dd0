"""Terminal output for people (rich) and for scripts (JSON)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from pagehaul.kernel import PAGE_SIZE

if TYPE_CHECKING:
    from sender.config import Progress as SendProgress
    from sender.config import SendResult
    from sender.migrate import MigrateResult
    from sender.trackers.base import Availability


def make_console() -> Console:
    """stdout console; 120 columns when not a terminal (logs, CI) instead of rich's 80."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@contextmanager
def progress_display(enabled: bool = True) -> Iterator[Callable[[SendProgress], None] | None]:
    """A progress bar on stderr while pages move; yields the callback for the sender."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("round {task.fields[round]}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TextColumn("wire {task.fields[wire]}"),
                  TextColumn("dirty {task.fields[dirty]}"), TextColumn("{task.fields[downtime]}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("send", total=None, round=0, wire="0 B", dirty="-", downtime="")

        def update(p: SendProgress) -> None:
            page = PAGE_SIZE
            est = (f"est. downtime {p.estimated_downtime_ms:.0f} ms" if p.estimated_downtime_ms and not p.frozen
                   else "frozen" if p.frozen else "")
            bar.update(task, total=p.pages_total * page, completed=p.pages_done * page,
                       round=f"{p.round}{' (final)' if p.frozen else ''}", wire=human_bytes(p.wire_bytes),
                       dirty=f"{p.dirty_pages:,}", downtime=est)

        yield update


def _printable(result: SendResult) -> SendResult:
    """Without what a caller of migrate() still holds (digests, the stop guard, the live target).

    ``phases`` (``sender.phases``) are in the JSON only: each with its start and duration in µs."""
    return dataclasses.replace(result, holdings={}, stop_guard=None, after_final=None)


def result_dict(result: SendResult) -> dict[str, Any]:
    doc = dataclasses.asdict(_printable(result))
    del doc["holdings"], doc["stop_guard"], doc["after_final"]
    for r, stats in zip(doc["rounds"], result.rounds, strict=True):
        r["compression_ratio"] = round(stats.compression_ratio, 3)
    return doc


def print_send_result(result: SendResult, as_json: bool = False, console: Console | None = None) -> None:
    if as_json:
        json.dump(result_dict(result), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = console or make_console()
    table = Table(title=f"pid {result.pid} -> session {result.session_id} (pages)", title_justify="left")
    for col in ("round", "scanned", "dirty", "written", "zero", "parent", "wire", "ratio", "memdump"):
        table.add_column(col, justify="right")
    for r in result.rounds:
        table.add_row(f"{r.round}{' frozen' if r.frozen else ''}", f"{r.pages_scanned:,}", f"{r.dirty_pages:,}",
                      f"{r.pages_written:,}", f"{r.pages_zero:,}", f"{r.pages_skipped_parent:,}",
                      human_bytes(r.wire_bytes), f"{r.compression_ratio:.2f}x" if r.wire_bytes else "-",
                      f"{r.memdump_time_us / 1000:.0f} ms")
    console.print(table)
    state = "left stopped" if result.left_stopped else "resumed"
    verdict = "converged" if result.converged else "did not converge"
    target = (f"{result.processes} processes, {result.shmem_objects} shared-memory objects, "
              if result.processes > 1 or result.shmem_objects else "")
    freezer = f", freezer {result.freezer}" if result.freezer else ""
    console.print(f"{target}tracker {result.tracker}, scanner {result.scanner}{freezer}, {result.vmas} VMAs; "
                  f"pre-copy {verdict}: {result.stop_reason}")
    frozen = f"[bold]frozen {result.frozen_time_us / 1000:.0f} ms[/]"
    console.print(f"{frozen} (freezing {result.freezing_time_us / 1000:.1f} ms), "
                  f"total {result.total_time_us / 1000:.0f} ms; process {state}")


def print_trackers(found: Sequence[Availability], console: Console | None = None) -> None:
    console = console or make_console()
    table = Table(title="dirty trackers on this kernel (auto picks the first available)", title_justify="left")
    for col in ("tracker", "available", "why"):
        table.add_column(col)
    for a in found:
        table.add_row(a.name, "yes" if a.available else "no", a.reason)
    console.print(table)


def print_migrate_result(result: MigrateResult, as_json: bool = False, console: Console | None = None) -> None:
    """The send table, then where the process runs now and the downtime in its parts."""
    if as_json:
        doc = dataclasses.asdict(dataclasses.replace(result, send=_printable(result.send)))
        doc["send"] = result_dict(result.send)
        del doc["send"]["phases"]  # the send's phases begin the migration's, at the top level
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = console or make_console()
    print_send_result(result.send, console=console)
    d = result.downtime
    table = Table(title="downtime: source frozen -> restored tree running on the destination", title_justify="left")
    for col in ("part", "ms"):
        table.add_column(col, justify="right" if col == "ms" else "left")
    for name, us in (("final round (pagehaul, frozen)", d.final_round_us), ("criu dump (local)", d.criu_dump_us),
                     ("drop memory already moved", d.reduce_us), ("ship images", d.ship_us),
                     ("assemble on destination", d.assemble_us), ("criu restore", d.restore_us)):
        table.add_row(name, f"{us / 1000:.1f}")
    table.add_row("[bold]total[/]", f"[bold]{d.total_us / 1000:.1f}[/]")
    console.print(table)
    console.print(f"{result.tasks} task(s) restored as pid {result.restored_pid} on the destination "
                  f"({result.images_dir}); shipped {result.shipped_files} CRIU files, "
                  f"{human_bytes(result.shipped_bytes)} ({result.extra_pages} pages from CRIU's dump, of which "
                  f"{result.changed_pages} changed after pagehaul's final round; {result.dropped_pages:,} pages of "
                  "CRIU's dump proven already moved by pagehaul); source killed")
    if result.moved_addresses:
        console.print(f"moved with it, connections kept: {', '.join(result.moved_addresses)}")
    if result.dump_error:
        console.print(f"[yellow]warning:[/] {result.dump_error}")
