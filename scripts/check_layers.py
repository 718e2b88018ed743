"""Check the import layering of pyproject.toml's [tool.importlinter] contracts (run by .ci/run and the tests).

The plugin folders (prompts/, datamodules/, callbacks/, configs/) install under the samlight namespace through
setuptools' package-dir, which import-linter cannot follow in a source tree. So the tree is assembled the way a
wheel lays it out, in a temporary folder, and `lint-imports` runs on that copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def assemble(root: Path, dest: Path) -> Path:
    """Copy samlight/ and each package-dir folder into `dest` as the installed package tree; returns dest."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "samlight", dest / "samlight", ignore=ignore)
    for package, folder in config["tool"]["setuptools"]["package-dir"].items():
        shutil.copytree(root / folder, dest / Path(*package.split(".")), ignore=ignore)
    return dest


def check(root: Path = ROOT) -> subprocess.CompletedProcess:
    """Run lint-imports on an assembled copy of `root`; returns the finished process (stdout + stderr)."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    with tempfile.TemporaryDirectory() as tmp:
        tree = assemble(root, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        return subprocess.run(
            [lint, str(root / "pyproject.toml"), "--no-cache"],
            cwd=tree, env=env, capture_output=True, text=True,
        )


if __name__ == "__main__":
    result = check()
    print(result.stdout + result.stderr)
    sys.exit(result.returncode)
