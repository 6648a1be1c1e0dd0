"""CRIU's own options, passed through the way CRIU users write them.

Two ways, on each side (``migrate`` for ``criu dump``, ``receive --restore`` for ``criu restore``):

* ``--criu-opt OPTION`` (repeatable): one argument as CRIU takes it, e.g. ``--criu-opt=--skip-in-flight``
  or ``--criu-opt=--external=mnt[/data]:data``;
* ``--criu-config FILE``: a CRIU configuration file (criu/config.c: one option per line, without
  the leading dashes, ``#`` starts a comment), given to CRIU as ``--config FILE``.

Options that pagehaul sets itself, or that would break the handover, are refused with the reason:
the images directory and logs are pagehaul's, the tree must stay stopped for the dump
(``--leave-running`` would let the source run on while the destination restores it), memory is
pagehaul's (lazy pages, page server, pre-dump chains), and the restore must finish detached.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pagehaul.errors import ConfigError

Side = Literal["dump", "restore"]

_OURS: Final = "pagehaul sets it itself"
_COMMON: Final[Mapping[str, str]] = {
    "images-dir": _OURS, "D": _OURS, "work-dir": _OURS, "W": _OURS, "log-file": _OURS, "o": _OURS,
    "config": "give the file with --criu-config", "lazy-pages": "memory is pagehaul's",
    "page-server": "memory is pagehaul's", "address": "memory is pagehaul's", "port": "memory is pagehaul's",
    "ps-socket": "memory is pagehaul's", "status-fd": _OURS, "pidfile": _OURS,
    "tcp-close": "use pagehaul's --tcp-close",
    "shell-job": "use pagehaul's --shell-job", "j": "use pagehaul's --shell-job",
}
REFUSED: Final[Mapping[Side, Mapping[str, str]]] = {
    "dump": {**_COMMON,
             "leave-running": "the source must stay stopped until the destination runs it",
             "R": "the source must stay stopped until the destination runs it",
             "leave-stopped": _OURS, "tree": _OURS, "t": _OURS,
             "prev-images-dir": "memory is pagehaul's", "track-mem": "memory is pagehaul's"},
    "restore": {**_COMMON,
                "restore-detached": _OURS, "d": _OURS, "restore-sibling": "the receiver must own the restored tree",
                "S": "the receiver must own the restored tree"},
}


@dataclass(frozen=True, slots=True)
class CriuOptions:
    """Extra arguments for one criu command: validated pass-through options, and a config file."""

    opts: tuple[str, ...] = ()
    config: Path | None = None

    def argv(self) -> list[str]:
        return [*self.opts, *(["--config", str(self.config)] if self.config is not None else [])]

    def has(self, name: str) -> bool:
        """Is option ``name`` (e.g. ``network-lock``) among these, given directly or in the config file?"""
        if any(_name(option) == name for option in self.opts):
            return True
        if self.config is None:
            return False
        try:
            lines = self.config.read_text().splitlines()
        except OSError:
            return False
        return any(words and words[0] == name for words in (shlex.split(line, comments=True) for line in lines))


def _name(option: str) -> str:
    """The option's name as the refusal table has it: ``--tcp-close`` -> ``tcp-close``, ``-R`` -> ``R``."""
    if option.startswith("--"):
        return option[2:].split("=", 1)[0]
    if option.startswith("-") and len(option) >= 2:
        return option[1]
    return ""


def _check(side: Side, option: str, where: str) -> None:
    name = _name(option)
    if not name:
        raise ConfigError(f"{where}: {option!r} is not an option (give each as --criu-opt=--name[=value])")
    reason = REFUSED[side].get(name)
    if reason is not None:
        raise ConfigError(f"{where}: criu {side} option {option!r} is refused: {reason}")


def parse(side: Side, opts: Sequence[str], config: Path | None) -> CriuOptions:
    """Validate ``--criu-opt`` values and the options in a CRIU config file for ``criu <side>``."""
    for option in opts:
        _check(side, option, "--criu-opt")
    if config is not None:
        try:
            text = config.read_text()
        except OSError as err:
            raise ConfigError(f"--criu-config {config}: {err.strerror}") from err
        for number, line in enumerate(text.splitlines(), 1):
            words = shlex.split(line, comments=True)
            if words:
                _check(side, "--" + words[0], f"{config}:{number}")
    return CriuOptions(tuple(opts), config.resolve() if config is not None else None)
