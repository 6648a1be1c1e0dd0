"""CRIU options passed through: accepted as CRIU users write them, refused where they would break
the handover, from the command line and from a CRIU configuration file alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagehaul.criu_opts import CriuOptions, parse
from pagehaul.errors import ConfigError


def test_options_pass_through_in_order_with_the_config_file_last(tmp_path: Path) -> None:
    config = tmp_path / "criu.conf"
    config.write_text("# site options\nskip-in-flight\nexternal 'mnt[/data]:data'  # a bind mount\n\n")
    opts = parse("dump", ["--tcp-established", "--ghost-limit=10M"], config)
    assert opts.argv() == ["--tcp-established", "--ghost-limit=10M", "--config", str(config.resolve())]
    assert CriuOptions().argv() == []


@pytest.mark.parametrize(("side", "option", "reason"), [
    ("dump", "--leave-running", "the source must stay stopped"),
    ("dump", "-R", "the source must stay stopped"),
    ("dump", "--images-dir=/tmp/x", "pagehaul sets it itself"),
    ("dump", "--lazy-pages", "memory is pagehaul's"),
    ("dump", "--tcp-close", "use pagehaul's --tcp-close"),
    ("restore", "--restore-detached", "pagehaul sets it itself"),
    ("restore", "--restore-sibling", "the receiver must own the restored tree"),
    ("restore", "--config=/etc/x", "give the file with --criu-config"),
])
def test_options_that_break_the_handover_are_refused(side: str, option: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"criu {side} option '{option}' is refused: {reason}"):
        parse(side, [option], None)  # type: ignore[arg-type]


def test_config_file_lines_are_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "criu.conf"
    config.write_text("tcp-established\nleave-running\n")
    with pytest.raises(ConfigError, match=r"criu.conf:2: criu dump option '--leave-running' is refused"):
        parse("dump", [], config)
    with pytest.raises(ConfigError, match=r"no-such\.conf: No such file"):
        parse("dump", [], tmp_path / "no-such.conf")


def test_a_value_without_dashes_is_not_an_option() -> None:
    with pytest.raises(ConfigError, match=r"'skip-in-flight' is not an option \(give each as --criu-opt=--name"):
        parse("dump", ["skip-in-flight"], None)


def test_has_finds_an_option_given_directly_or_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "criu.conf"
    config.write_text("# locks\nnetwork-lock iptables\n")
    opts = parse("dump", ["--tcp-established", "-v4"], config)
    assert opts.has("tcp-established")
    assert opts.has("network-lock")
    assert not opts.has("skip-in-flight")
    assert not parse("dump", ["--skip-in-flight"], None).has("network-lock")
