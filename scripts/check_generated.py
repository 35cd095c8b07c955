"""Fails when regenerating gen/ from protos/ would change anything (the committed code has drifted)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        shutil.copytree(ROOT / "protos", copy / "protos")
        shutil.copytree(ROOT / "scripts", copy / "scripts")
        subprocess.run([sys.executable, str(copy / "scripts" / "gen_protos.py")], check=True, capture_output=True)
        fresh, committed = copy / "gen" / "imagegen", ROOT / "gen" / "imagegen"
        drift = _differences(filecmp.dircmp(fresh, committed))
    if drift:
        print("gen/ is out of date with protos/ (run `make proto` and commit):", *drift, sep="\n  ")
        return 1
    print("gen/ matches protos/")
    return 0


def _differences(cmp: filecmp.dircmp[str], prefix: str = "") -> list[str]:
    found = [
        f"{prefix}{name}"
        for name in cmp.left_only + cmp.right_only + cmp.diff_files
        if not name.startswith("__pycache__")
    ]
    for name, sub in cmp.subdirs.items():
        if name != "__pycache__":
            found += _differences(sub, f"{prefix}{name}/")
    return found


if __name__ == "__main__":
    sys.exit(main())
