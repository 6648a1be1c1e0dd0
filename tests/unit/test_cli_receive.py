"""``pagehaul receive``'s resource-bound options (README, "Receiver resource bounds"): each reaches
the receiver's configuration, and a bad value is refused with one line and exit code 2 before
anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import _HOLE_RUNS_DEFAULT, _receiver_config, build_parser, main
from receiver.config import ReceiverConfig
from receiver.restore import RestoreConfig
from receiver.session import SessionLimits


def config(tmp_path: Path, *extra: str) -> ReceiverConfig:
    args = build_parser().parse_args(["receive", "--insecure", "--images-dir", str(tmp_path), *extra])
    return _receiver_config(args)


def test_defaults_are_the_receivers_own(tmp_path: Path) -> None:
    cfg = config(tmp_path, "--restore", "--criu", "/bin/false")
    assert cfg.limits == SessionLimits()
    assert SessionLimits().max_hole_runs == _HOLE_RUNS_DEFAULT
    assert cfg.max_open_files is None
    assert cfg.restore is not None
    defaults = RestoreConfig(Path("/bin/false"))
    assert (cfg.restore.idle_timeout_s, cfg.restore.timeout_s) == (defaults.idle_timeout_s, defaults.timeout_s)


def test_every_bound_reaches_the_config(tmp_path: Path) -> None:
    cfg = config(tmp_path, "--max-open-files", "512", "--max-hole-runs", "1000", "--max-sessions", "3",
                 "--restore", "--criu", "/bin/false", "--restore-idle-timeout", "2.5", "--restore-timeout", "90")
    assert cfg.max_open_files == 512
    assert cfg.limits.max_hole_runs == 1000
    assert cfg.max_sessions == 3
    assert cfg.restore is not None
    assert (cfg.restore.idle_timeout_s, cfg.restore.timeout_s) == (2.5, 90.0)


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-open-files", "0"], "--max-open-files must be at least 1, not 0"),
    (["--max-open-files", "many"], "--max-open-files must be a whole number, not 'many'"),
    (["--max-hole-runs", "-5"], "--max-hole-runs must be at least 1, not -5"),
    (["--max-hole-runs", "1e6"], "--max-hole-runs must be a whole number, not '1e6'"),
    (["--restore", "--criu", "/bin/false", "--restore-idle-timeout", "0"],
     "--restore-idle-timeout must be a positive number of seconds, not 0"),
    (["--restore", "--criu", "/bin/false", "--restore-timeout", "inf"],
     "--restore-timeout must be a positive number of seconds, not inf"),
    (["--restore", "--criu", "/bin/false", "--restore-timeout", "soon"],
     "--restore-timeout must be a number of seconds, not 'soon'"),
    (["--restore-idle-timeout", "5"], "--restore-idle-timeout/--restore-timeout need --restore"),
    (["--resume-window", "-1"], "--resume-window must be a positive number of seconds"),
    (["--idle-timeout", "0"], "--idle-timeout must be a positive number of seconds"),
    (["--max-sessions", "0"], "--max-sessions must be at least 1"),
    (["--criu-page-server", "127.0.0.1:0", "--criu-images-dir", "/nonexistent", "--criu-page-server-tls"],
     "--criu-page-server-tls needs --tls-cert, --tls-key and --tls-ca"),
    (["--criu-page-server-tls"],
     "--criu-images-dir/--criu-prev-images-dir/--criu-page-server-tls need --criu-page-server"),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                           message: str) -> None:
    code = main(["receive", "--insecure", "--images-dir", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if "WARNING" not in line] == [f"pagehaul: error: {message}"]
    assert list(tmp_path.iterdir()) == [], "nothing started"
