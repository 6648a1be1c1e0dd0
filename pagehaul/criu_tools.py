"""Locate and run the private CRIU tools (criu, crit) that ``scripts/install-criu.sh`` installs.

pagehaul writes CRIU image files itself; crit, CRIU's own image tool, is the independent check that
those files decode, and criu restores them in the end-to-end tests. The machine's packaged criu is
never used: Debian 12's 3.17 fails on current kernels, so CRIU 4.2.x comes from Debian sid and lives
in a private prefix (``$PAGEHAUL_CRIU_PREFIX``, else ``~/.cache/pagehaul/criu-4.2.1``) whose
``bin/criu`` and ``bin/crit`` are wrapper scripts.

    tools = CriuTools.locate()          # None until scripts/install-criu.sh has run
    if tools is not None:
        image = tools.crit_decode(Path("pagemap-1.img"))
        image["magic"]                  # "PAGEMAP"

``crit decode`` prints protobuf fields as plain JSON numbers; with ``pretty=True`` (crit's
``--pretty``) hex-annotated fields such as a pagemap entry's ``vaddr`` become strings ("0x400000")
and flag fields become names ("PE_PRESENT", "PE_LAZY | PE_PRESENT").
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from pagehaul.errors import ImageError, PagehaulError

CRIU_VERSION: Final = "4.2.1"
PREFIX_ENV: Final = "PAGEHAUL_CRIU_PREFIX"
DEFAULT_PREFIX: Final = Path.home() / ".cache" / "pagehaul" / f"criu-{CRIU_VERSION}"
"""Where the installer puts the tools when ``$PAGEHAUL_CRIU_PREFIX`` is unset or empty."""

DECODE_TIMEOUT_S: Final = 120.0
VERSION_TIMEOUT_S: Final = 30.0

_VERSION_RE: Final = re.compile(r"^Version:\s*(\S+)", re.MULTILINE)


def default_prefix() -> Path:
    """The prefix in force now: ``$PAGEHAUL_CRIU_PREFIX`` if set and non-empty, else DEFAULT_PREFIX.

    Read at call time, like the installer's ``${PAGEHAUL_CRIU_PREFIX:-...}``, so a test or a caller
    that sets the variable after import is honoured.
    """
    env = os.environ.get(PREFIX_ENV)
    return Path(env).expanduser() if env else DEFAULT_PREFIX


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _stderr_summary(stderr: str, returncode: int) -> str:
    """One line out of a tool's stderr: a Python traceback's final line, else the first line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return f"exit status {returncode}, no message"
    if any(line.startswith("Traceback ") for line in lines):
        return lines[-1]
    return lines[0]


@dataclass(frozen=True)
class CriuTools:
    """The criu and crit wrappers of one installed prefix."""

    prefix: Path

    @property
    def criu(self) -> Path:
        return self.prefix / "bin" / "criu"

    @property
    def crit(self) -> Path:
        return self.prefix / "bin" / "crit"

    @classmethod
    def locate(cls, prefix: Path | None = None) -> CriuTools | None:
        """The tools under ``prefix`` (default: default_prefix()), or None if not installed there.

        Installed means both wrappers exist and are executable; whether they run is for
        criu_version() and crit_decode() to find out.
        """
        tools = cls(prefix if prefix is not None else default_prefix())
        if _is_executable(tools.criu) and _is_executable(tools.crit):
            return tools
        return None

    def _run(self, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise PagehaulError(f"{argv[0]} {argv[1]} timed out after {timeout_s:g} s") from err
        except OSError as err:
            raise PagehaulError(
                f"cannot run {argv[0]}: {err.strerror or err}; install it with scripts/install-criu.sh"
            ) from err

    def criu_version(self) -> str:
        """criu's version, e.g. "4.2.1", as ``criu --version`` reports it."""
        proc = self._run([str(self.criu), "--version"], VERSION_TIMEOUT_S)
        if proc.returncode != 0:
            raise PagehaulError(
                f"{self.criu} --version failed: {_stderr_summary(proc.stderr, proc.returncode)}"
            )
        match = _VERSION_RE.search(proc.stdout)
        if match is None:
            raise PagehaulError(f"{self.criu} --version printed no version: {proc.stdout.strip()!r}")
        return match.group(1)

    def crit_decode(
        self, image: Path, *, pretty: bool = False, timeout_s: float = DECODE_TIMEOUT_S
    ) -> dict[str, Any]:
        """Decode one CRIU image file with ``crit decode -i IMAGE`` and return crit's JSON.

        The result has ``magic`` (the image type's name, e.g. "PAGEMAP") and ``entries`` (one dict per
        protobuf entry, fields named as in CRIU's .proto files). ``pretty`` passes ``--pretty``, which
        turns hex fields into "0x..." strings and flag fields into names.

        Raises ImageError, with crit's complaint on one line, if crit rejects the image, and
        PagehaulError if crit cannot be run at all.
        """
        argv = [str(self.crit), "decode", "-i", str(image)]
        if pretty:
            argv.append("--pretty")
        proc = self._run(argv, timeout_s)
        if proc.returncode != 0:
            raise ImageError(
                f"crit cannot decode {image}: {_stderr_summary(proc.stderr, proc.returncode)}"
            )
        try:
            decoded = json.loads(proc.stdout)
        except json.JSONDecodeError as err:
            raise ImageError(f"crit printed no JSON for {image}: {err}") from err
        if not isinstance(decoded, dict):
            raise ImageError(f"crit printed a JSON {type(decoded).__name__}, not an object, for {image}")
        return decoded


# criu's complaints that stop nothing (it cannot raise its own RLIMIT_NOFILE in a container).
_HARMLESS: Final = ("rlimit: Can't setup RLIMIT_NOFILE",)


def criu_first_error(log_path: Path) -> str:
    """The first line of a criu log that says Error (and matters), else its last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"no log at {log_path}"
    for line in lines:
        if "Error" in line and not any(h in line for h in _HARMLESS):
            return line.strip()
    return lines[-1].strip() if lines else "empty log"


async def run_criu(argv: list[str], *, log: Path, timeout_s: float, out: int | IO[bytes] = subprocess.DEVNULL,
                   hint: Callable[[str], str] = lambda _reason: "", pass_fds: tuple[int, ...] = (),
                   while_running: Callable[[], Awaitable[None]] | None = None,
                   started: Callable[[int], None] | None = None) -> None:
    """Run ``criu`` (``argv[0]``, command ``argv[1]``) without blocking the event loop.

    ``pass_fds`` are inherited by criu; ``started`` is called with criu's pid once it runs;
    ``while_running`` is awaited once criu has started (it must return when criu exits), then
    criu's exit. Raises PagehaulError when it cannot start, outlives ``timeout_s`` (killed) or
    fails: the message names the first error of its ``log`` (plus ``hint(reason)``) and where the
    log is.
    """
    what = f"criu {argv[1]}"
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                    pass_fds=pass_fds)
    except OSError as err:
        raise PagehaulError(f"cannot run {argv[0]}: {err.strerror}") from err
    try:
        if started is not None:
            started(proc.pid)
        async with asyncio.timeout(timeout_s):
            if while_running is not None:
                await while_running()
            rc = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PagehaulError(f"{what} took longer than {timeout_s:g} s; log: {log}") from None
    if rc != 0:
        reason = _failure_reason(log, out)
        raise PagehaulError(f"{what} failed (exit {rc}): {reason}{hint(reason)}; log: {log}")


def _failure_reason(log: Path, out: int | IO[bytes]) -> str:
    """The first error of criu's log, or, when criu stopped before opening it, of what it printed
    (``out``, when that is a file)."""
    name = getattr(out, "name", None)
    if log.exists() or not isinstance(name, str):
        return criu_first_error(log)
    out.flush()  # type: ignore[union-attr]  # a file object, as its name says
    return criu_first_error(Path(name))
