"""Helpers for the annotation-tool tests: a tiny checkpoint, a small image folder, a session, a live server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, n: int = 3, size: tuple[int, int] = (96, 128)) -> list[str]:
    """n PNG images with a bright rectangle each (plus one JPEG in a subfolder); returns their ids."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        image = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
        image[20 + i : 60 + i, 30:90] = 220
        Image.fromarray(image).save(folder / f"img{i}.png")
        ids.append(f"img{i}.png")
    (folder / "sub").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / "sub" / "photo.jpg")
    return sorted([*ids, "sub/photo.jpg"])


def tiny_checkpoint(path: Path) -> Path:
    """The tiny variant with random weights (seed 0), in the official layout."""
    import samlight

    torch.manual_seed(0)
    samlight.save_official(samlight.build_sam("tiny"), path)
    return path


def session(tmp_path: Path, *extra: str):
    """(engine, store, retrainer, app test client) for a fresh tiny session in tmp_path."""
    from samlight.cli.annotate import _parser, build_session
    from samlight.inference.annotate.server import create_app

    ckpt = tmp_path / "tiny.pth"
    if not ckpt.exists():
        tiny_checkpoint(ckpt)
    if not (tmp_path / "images").exists():
        make_images(tmp_path / "images")
    args = _parser().parse_args(
        [
            "--checkpoint",
            str(ckpt),
            "--images",
            str(tmp_path / "images"),
            "--output",
            str(tmp_path / "out"),
            *extra,
        ]
    )
    engine, store, retrainer = build_session(args)
    return engine, store, retrainer, create_app(engine, store, retrainer).test_client()


class LiveServer:
    """`samlight annotate` as a real subprocess on a free port (parsed from its "open http://..." line)."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        ckpt = tmp_path / "tiny.pth"
        if not ckpt.exists():
            tiny_checkpoint(ckpt)
        if not (tmp_path / "images").exists():
            make_images(tmp_path / "images")
        self.log = open(tmp_path / "server.log", "a")
        args = [
            "--checkpoint",
            str(ckpt),
            "--images",
            str(tmp_path / "images"),
            "--output",
            str(tmp_path / "out"),
        ]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "samlight.cli.main", "annotate", *args, "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        deadline = time.time() + 60
        self.url = None
        while time.time() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            match = re.search(r"open (http://\S+?)/?$", line.strip())
            if match:
                self.url = match.group(1)
                break
        if self.url is None:
            self.process.kill()
            raise RuntimeError(f"server did not start; see {tmp_path / 'server.log'}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no cleanup code runs
        self.process.wait(10)
        self.process.stdout.close()
        self.log.close()
