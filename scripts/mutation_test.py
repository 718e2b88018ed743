"""Mutation testing of the recipe modules (prompts, clicks, the episode, the loss) with mutmut.

mutmut records which test reaches which mutant by the module name the function runs under
(`samlight.prompts.clicks`). The plugin folders install under the samlight namespace from top-level folders
(`prompts/` -> `samlight.prompts`), so mutating them in place would never match. This script stages the
installed layout (`samlight/`, `samlight/prompts/`, ...) plus `tests/` and `pyproject.toml` in a scratch
folder, runs `mutmut run` there with the `[tool.mutmut]` settings of pyproject.toml, and prints the kill rate.

    python scripts/mutation_test.py [--stage DIR] [--max-children N] [--timeout SECONDS] [MUTANT_GLOB ...]

Globs (e.g. "samlight.prompts.box*") are run one after the other, so a bounded run covers them in that order.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {
    "samlight": "samlight",
    "prompts": "samlight/prompts",
    "datamodules": "samlight/datamodules",
    "callbacks": "samlight/callbacks",
    "configs": "samlight/configs",
    "tests": "tests",
}


def stage(folder: Path) -> None:
    """Copy the sources in their installed layout (keeping mutmut's cache in `mutants/` between runs)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for src, dst in LAYOUT.items():
        target = folder / dst
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / src, target, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", folder / "pyproject.toml")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=Path, default=Path("/tmp/samlight-mutmut"))
    parser.add_argument("--max-children", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=3600, help="stop mutmut after this many seconds")
    parser.add_argument("globs", nargs="*", help="mutant name globs, run in this order (default: all)")
    args = parser.parse_args()
    args.stage.mkdir(parents=True, exist_ok=True)
    stage(args.stage)
    deadline = time.monotonic() + args.timeout
    # Each wildcard glob in its own run, in the order given; exact mutant names together in one run.
    exact = [g for g in args.globs if "*" not in g]
    batches = [[g] for g in args.globs if "*" in g] + ([exact] if exact else [])
    for names in batches or [[]]:
        run = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *names]
        # Its own process group: on timeout the forkserver and its workers end with it, none left orphaned.
        process = subprocess.Popen(run, cwd=args.stage, start_new_session=True)
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            print(f"mutmut stopped after {args.timeout} s: the rates below cover the mutants tested so far")
            break
    results = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=args.stage,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    counts: dict[str, dict[str, int]] = {}
    for line in results.splitlines():
        match = re.match(r"\s*(samlight\.[\w.]+?)\.x\S*__mutmut_\d+: (\w[\w ]*)", line)
        if match:
            module, status = match.groups()
            counts.setdefault(module, {}).setdefault(status.strip(), 0)
            counts[module][status.strip()] += 1
    total_killed = total = 0
    for module, by_status in sorted(counts.items()):
        killed, tested = (
            by_status.get("killed", 0),
            sum(v for k, v in by_status.items() if k != "not checked"),
        )
        total_killed, total = total_killed + killed, total + tested
        print(f"{module}: {killed}/{tested} killed ({100 * killed / max(tested, 1):.0f}%) {by_status}")
    print(f"all: {total_killed}/{total} killed ({100 * total_killed / max(total, 1):.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
