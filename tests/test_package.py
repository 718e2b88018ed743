"""The wheel installs the top-level plugin folders under the samlight namespace (DESIGN.md section 1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "samlight", "prompts", "datamodules", "callbacks", "configs")

CHECK = """
import importlib, importlib.metadata as md, json, sys
mods = ["samlight", "samlight.prompts", "samlight.datamodules", "samlight.callbacks", "samlight.configs",
        "samlight.modeling.sam", "samlight.prompts.types", "samlight.datamodules.batch"]
files = {m: importlib.import_module(m).__file__ for m in mods}
eps = sorted(e.name for e in md.entry_points(group="samlight.prompts"))
scripts = [e.value for e in md.entry_points(group="console_scripts") if e.name == "samlight"]
print(json.dumps({"files": files, "eps": eps, "scripts": scripts}))
"""


def test_wheel_installs_plugin_namespaces(tmp_path):
    # Build from a copy so concurrent test runs never share setuptools' build/ folder in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True
    )
    (wheel,) = wheels.glob("samlight-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    # Nothing generic lands at the top level of site-packages.
    top = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", "__pycache__"))}
    assert top <= {"samlight", "bin"}, top
    assert list((site / "samlight" / "configs").glob("*.yaml")), "packaged configs missing"
    static = site / "samlight" / "inference" / "annotate" / "static"
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in static.iterdir()}, "annotate page missing"

    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    info = json.loads(out.strip().splitlines()[-1])
    for module, file in info["files"].items():
        assert Path(file).resolve().is_relative_to(site.resolve()), (
            module,
            file,
        )  # the wheel, not the checkout
    assert {"box", "mask", "point", "text"} <= set(info["eps"])
    assert "samlight.cli.main:main" in info["scripts"]
