"""Mutual TLS and the shared token, with real certificates and real servers: the wrong client
is refused before any data is accepted, and the right one migrates."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.demo import dump_ranges
from pagehaul.errors import AccessDenied, ConfigError, TransportError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from pagehaul.security import Security, TlsFiles, make_test_pki
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from sender.config import SendConfig
from sender.precopy import send_frozen
from tests.conftest import Workload

TOKEN = "s3cret-token-for-tests-0123456789"  # noqa: S105 -- a test fixture, not a credential


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    make_test_pki(tmp_path / "pki")
    return tmp_path / "pki"


def files(pki: Path, role: str) -> TlsFiles:
    return TlsFiles(pki / f"{role}.crt", pki / f"{role}.key", pki / "ca.crt")


@pytest.fixture
async def tls_receiver(tmp_path: Path, pki: Path) -> AsyncIterator[Receiver]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = ReceiverConfig(images_dir=tmp_path / "images", listen="127.0.0.1:0",
                         security=Security(tls=files(pki, "receiver"), token=TOKEN))
    r = Receiver(cfg)
    await r.start()
    try:
        yield r
    finally:
        await r.stop(0)


def sessions(r: Receiver) -> list[str]:
    return sorted(p.name for p in r.config.images_dir.iterdir())


async def test_mutual_tls_with_token_migrates(tls_receiver: Receiver, workload: Workload, pki: Path) -> None:
    cfg = SendConfig(pid=workload.pid, target=tls_receiver.address, leave_stopped=True,
                     security=Security(tls=files(pki, "sender"), token=TOKEN))
    result = await send_frozen(cfg)
    round_dir = tls_receiver.config.images_dir / result.session_id / "round-0"
    assert verify_against_process(round_dir, workload.pid, dump_ranges(workload.pid), PAGE_SIZE).ok


async def test_certificate_from_another_ca_is_refused(tls_receiver: Receiver, workload: Workload,
                                                      tmp_path: Path) -> None:
    make_test_pki(tmp_path / "other")
    cfg = SendConfig(pid=workload.pid, target=tls_receiver.address, connect_timeout_s=2,
                     security=Security(tls=files(tmp_path / "other", "sender"), token=TOKEN))
    with pytest.raises(TransportError, match="with TLS"):
        await send_frozen(cfg)
    assert sessions(tls_receiver) == []


async def test_plain_tcp_client_is_refused(tls_receiver: Receiver, workload: Workload) -> None:
    cfg = SendConfig(pid=workload.pid, target=tls_receiver.address, connect_timeout_s=2)
    with pytest.raises(TransportError):
        await send_frozen(cfg)
    assert sessions(tls_receiver) == []


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token-wrong"])
async def test_missing_or_wrong_token_is_refused(tls_receiver: Receiver, workload: Workload, pki: Path,
                                                 token: str | None) -> None:
    cfg = SendConfig(pid=workload.pid, target=tls_receiver.address, leave_stopped=False,
                     security=Security(tls=files(pki, "sender"), token=token))
    with pytest.raises(AccessDenied, match="missing or wrong token"):
        await send_frozen(cfg)
    assert sessions(tls_receiver) == []


def test_security_must_be_chosen() -> None:
    with pytest.raises(ConfigError, match="--insecure"):
        Security()
    with pytest.raises(ConfigError, match="go together"):
        Security.from_args(Path("a"), None, None, None, insecure=False)


def test_receive_cli_requires_a_choice(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "receive", "--images-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("pagehaul: error: no TLS material given: pass --tls-cert, --tls-key and "
                                   "--tls-ca (make test ones with 'pagehaul certs'), or --insecure for plain TCP")


def test_certs_cli_writes_private_keys_private(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cli", "certs", "--out", str(tmp_path / "p")],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    names = sorted(Path(p).name for p in out)
    assert names == ["ca.crt", "ca.key", "receiver.crt", "receiver.key", "sender.crt", "sender.key"]
    for name in ("ca.key", "receiver.key", "sender.key"):
        assert stat.S_IMODE((tmp_path / "p" / name).stat().st_mode) == 0o600
