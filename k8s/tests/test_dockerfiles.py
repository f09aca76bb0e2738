"""The two Dockerfiles: hadolint-clean, and built the way the manifests assume. They cannot be
built here (no container registry to pull the base images from), so these checks read them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from manifests import K8S, render

DOCKERFILES = {"cpu": K8S / "Dockerfile.cpu", "cuda": K8S / "Dockerfile.cuda"}


def hadolint(text: str, tmp_path: Path) -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed (k8s/tests/run.py installs it)")
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    done = subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True)
    return (done.stdout + done.stderr).strip() if done.returncode else ""


def problems(flavour: str, text: str) -> list[str]:
    out = []
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    if len(stages) < 2:
        out.append("not multi-stage: the toolchain would ship in the image")
    final = text[text.rfind("\nFROM ") :]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    if not user or user[-1].split(":")[0] in ("0", "root") or not user[-1].split(":")[0].isdigit():
        out.append("the final stage must switch to a numeric non-root USER (runAsNonRoot checks it)")
    entry = re.findall(r"^ENTRYPOINT\s+(.+)$", final, re.M)
    if not entry or not entry[-1].startswith("[") or "tini" not in entry[-1] or "ferry-worker" not in entry[-1]:
        out.append("ENTRYPOINT must exec tini and ferry-worker (exec form), so SIGTERM reaches the worker")
    if "EXPOSE 9090" not in final:
        out.append("the final stage must EXPOSE 9090, the worker's http port")
    build = re.search(r"cargo build[^\n]*", text)
    features = re.search(r"--features\s+(\S+)", build.group(0)) if build else None
    wanted = {"tls"} | ({"cuda"} if flavour == "cuda" else set())
    if not build or "-p ferry-worker" not in build.group(0) or "--release" not in build.group(0):
        out.append("the worker must be built with cargo build --release -p ferry-worker")
    elif not features or not wanted <= set(features.group(1).split(",")):
        out.append(f"the build must enable {sorted(wanted)}")
    if re.search(r"\.gguf|COPY\s+models", text):
        out.append("the model must not be baked into the image")
    if flavour == "cuda" and ("-runtime-" not in final or not re.search(r"-devel-\S*\s+AS build", text)):
        out.append("the CUDA image builds on a -devel image and runs on a -runtime one")
    return out


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint_clean(flavour, tmp_path):
    findings = hadolint(DOCKERFILES[flavour].read_text(), tmp_path)
    assert not findings, findings


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_builds_what_the_manifests_run(flavour):
    assert not problems(flavour, DOCKERFILES[flavour].read_text())


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_context_leaves_out_outputs_and_models(flavour):
    ignore = DOCKERFILES[flavour].with_name(DOCKERFILES[flavour].name + ".dockerignore")
    entries = ignore.read_text().split() if ignore.exists() else []
    assert {"**/target", "models"} <= set(entries), f"{ignore.name} must exclude **/target and models"


def test_gpu_overlay_runs_the_built_cuda_version():
    cuda = re.search(r"ARG CUDA_VERSION=(\d+\.\d+)", DOCKERFILES["cuda"].read_text()).group(1)
    images = {
        c["image"]
        for d in render("gpu+redis")
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert any(image.endswith(f"cuda{cuda}") for image in images), f"{images} should be tagged cuda{cuda}"


BREAKERS = {
    "shell_entrypoint": lambda t: t.replace(
        'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/ferry-worker"]',
        "ENTRYPOINT /usr/local/bin/ferry-worker",
    ),
    "root_user": lambda t: t.replace("USER 10001:10001", "USER root"),
    "no_ssl": lambda t: t.replace(",tls", "").replace(" --features tls", ""),
    "one_stage": lambda t: re.sub(r"^FROM .* AS build$", "", t, flags=re.M).replace("COPY --from=build", "COPY"),
}


@pytest.mark.parametrize("breaker", BREAKERS)
@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_checks_notice_breakage(flavour, breaker):
    text = DOCKERFILES[flavour].read_text()
    broken = BREAKERS[breaker](text)
    assert broken != text, f"{breaker} changed nothing in {flavour}"
    assert problems(flavour, broken), f"nothing noticed {breaker} in Dockerfile.{flavour}"


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint_notices_breakage(flavour, tmp_path):
    # Without the reasoned exceptions, hadolint asks for pinned apt versions.
    text = DOCKERFILES[flavour].read_text().replace("# hadolint ignore=DL3008\n", "")
    assert "DL3008" in hadolint(text, tmp_path)
