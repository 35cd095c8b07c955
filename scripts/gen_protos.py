"""Regenerate gen/ from protos/: Python messages, gRPC stubs and mypy stubs.

The proto package path equals the Python import path (imagegen.job.v1), so the
generated imports need no rewriting. Output goes to a fresh folder that then
replaces gen/imagegen, so a deleted proto leaves no stale module behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def main() -> int:
    # protoc finds the mypy plugins on PATH; they sit beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proto_files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *proto_files,
        ]
        if protoc.main(args) != 0:
            return 1
        out = Path(tmp)
        # Regular packages, not namespace packages: mypy and editable installs find them the same way.
        for package_dir in sorted({p.parent for p in out.rglob("*.py*")}):
            while package_dir != out:
                (package_dir / "__init__.py").touch()
                package_dir = package_dir.parent
        (out / "imagegen" / "__init__.py").write_text('"""Generated gRPC and protobuf code. Do not edit."""\n')
        shutil.rmtree(GEN / "imagegen", ignore_errors=True)
        GEN.mkdir(exist_ok=True)
        shutil.copytree(out / "imagegen", GEN / "imagegen")
    return 0


if __name__ == "__main__":
    sys.exit(main())
