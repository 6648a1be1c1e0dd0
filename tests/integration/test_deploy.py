"""The container images, built and run for real: deploy/run-docker-test.sh starts a dockerd of its
own, builds both images, migrates a workload container with the sender container into the
receiver container, checks the images byte for byte, and cleans up.

It needs root, docker.io and debootstrap (.ci/docker-stage installs them) and takes about a
minute, so it runs only with PAGEHAUL_DOCKER_TEST=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "run-docker-test.sh"
TIMEOUT_S = 1800

pytestmark = pytest.mark.skipif(
    os.environ.get("PAGEHAUL_DOCKER_TEST") != "1",
    reason="set PAGEHAUL_DOCKER_TEST=1 to build the images and run them under a private dockerd "
           "(deploy/run-docker-test.sh; root, docker.io, debootstrap)",
)


def test_containers_migrate_a_container_process() -> None:
    env = {**os.environ, "PYTHON": sys.executable}  # the wheels are built with this interpreter's pip
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    sys.stderr.write(proc.stderr)  # shown by pytest with -rA or on failure: timings, sender result
    assert proc.returncode == 0, f"deploy/run-docker-test.sh exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    assert "run-docker-test: PASS" in proc.stderr
