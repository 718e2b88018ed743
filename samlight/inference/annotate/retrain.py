"""The model in the loop: fine-tune the served model on the masks annotated so far, in a background process.

A round runs the ordinary training recipe as a subprocess (`samlight fit` with a generated config; the weights
are then exported as `samlight export` does), so the server never imports the training code and the page keeps answering while it trains.
Before the round the held-out images are set aside (a stable hash of the image id picks about 20% of the
human-annotated images, at least one once there are two); the 1-click mIoU on their human masks is measured with
the current weights and again with the new ones (the paper's evaluation click: the mask pixel farthest from the
boundary; the candidate with the highest predicted IoU), then the new weights are swapped in.

Files: `OUTPUT/retrain/round_NNN/` holds `base.yaml` (the built-in fine-tune config), `data.yaml` (this round's
shards, starting weights and run folder), `fit.log`, `checkpoints/`, `sam.pth` (official layout) and
`result.json`; `OUTPUT/retrain/history.json` lists the finished rounds (the server resumes on the last one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pycocotools import mask as mask_utils

from samlight.inference.annotate.engine import AnnotationEngine, encoder_fingerprint
from samlight.inference.annotate.store import HUMAN, AnnotationStore, atomic_write_bytes
from samlight.inference.predictor import SamPredictor
from samlight.modeling.build import build_sam
from samlight.modeling.checkpoint import load_state_dict, save_state_dict
from samlight.modeling.sam import Sam
from samlight.modeling.weight_names import has_lora, merge_lora
from samlight.prompts.clicks import distance_to_boundary

log = logging.getLogger("samlight.annotate")


@dataclass
class RetrainSettings:
    """How rounds are run.

    Args:
        every: start a round by itself after this many new human masks (None: only from the button).
        config: the user's fine-tune config, merged over the built-in one (this round's shards, starting
            weights and run folder are always set last).
        steps: training steps of the built-in config.
        heldout_fraction: share of the human-annotated images kept out of training for the mIoU.
    """

    every: int | None = None
    config: Path | None = None
    steps: int = 200
    heldout_fraction: float = 0.2


def heldout_split(image_ids: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) ids: an image is held out when its id hashes below `fraction` (stable as images are
    added); with none held out and at least two images, the lowest-hashing one is."""
    if not image_ids:
        return [], []
    rank = {i: int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 2**32 for i in image_ids}
    held = [i for i in image_ids if rank[i] < fraction]
    if not held and len(image_ids) >= 2:
        held = [min(image_ids, key=rank.__getitem__)]
    if len(held) == len(image_ids):  # keep at least one image to train on
        held = held[1:]
    return [i for i in image_ids if i not in held], held


def base_config(variant: str, image_size: int, steps: int) -> dict[str, Any]:
    """The built-in fine-tune config: the paper's interactive recipe, short, with the image encoder frozen.

    A frozen encoder keeps every cached embedding valid (the swap is instant) and makes a round cheap enough
    for a CPU; train it too by giving --retrain-config with e.g. `model.freeze: []`.
    """
    on_gpu = torch.cuda.is_available()
    return {
        "seed_everything": 0,
        "model": {
            "variant": variant,
            "freeze": ["image_encoder"],
            "prompts": [
                {"class_path": "samlight.prompts.point.PointPrompt", "init_args": {"num_points": 1}},
                {
                    "class_path": "samlight.prompts.box.BoxPrompt",
                    "init_args": {"noise_std": 0.1, "max_noise": 20.0},
                },
            ],
            "prompt_weights": [0.5, 0.5],
            "clicks": {
                "class_path": "samlight.prompts.clicks.CorrectiveClicks",
                "init_args": {"num_clicks": 4, "mask_only_rounds": 1, "mode": "uniform"},
            },
            "optimizer": {
                "class_path": "samlight.training.optim.AdamWRecipe",
                "init_args": {
                    "lr": 1.0e-4,
                    "weight_decay": 0.01,
                    "layer_decay": 1.0,
                    "warmup_steps": min(20, max(1, steps // 10)),
                    "lr_milestones": [max(2, int(steps * 0.8))],
                    "lr_gamma": 0.1,
                },
            },
        },
        "data": {
            "class_path": "samlight.datamodules.SA1BDataModule",
            "init_args": {
                "image_size": image_size,
                "max_masks": 32,
                "batch_size": 2,
                "num_workers": 1,
                "batches_per_epoch": max(1, min(steps, 100)),
                "shuffle_buffer": 16,
            },
        },
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "precision": "bf16-mixed" if on_gpu else "32-true",
            "max_steps": steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 10,
            "enable_progress_bar": False,
        },
    }


def one_click_miou(
    model: Sam, store: AnnotationStore, engine: AnnotationEngine, image_ids: list[str]
) -> tuple[float | None, int]:
    """(mean IoU, number of masks) of one centre click per human mask of `image_ids` with `model`.

    Uses the engine's cached embeddings when `model` has the served encoder, else embeds the images itself.
    """
    same_encoder = encoder_fingerprint(model) == engine.fingerprint
    predictor = SamPredictor(model)
    ious = []
    for image_id in image_ids:
        anns = [a for a in store.annotations(image_id) if a.get("source") == HUMAN]
        if not anns:
            continue
        pixels = engine.pixels(image_id)
        if same_encoder:
            predictor.features = engine.embedding(image_id).to(predictor.device)
            predictor.original_size = pixels.shape[:2]
            predictor.input_size = engine.input_size(pixels.shape[:2])
            predictor.is_image_set = True
        else:
            predictor.set_image(pixels)
        gt = mask_utils.decode([a["segmentation"] for a in anns]).transpose(2, 0, 1).astype(bool)  # M x H x W
        dist = distance_to_boundary(torch.from_numpy(gt)).flatten(1)  # M x HW
        for mask, flat in zip(gt, dist.argmax(1).tolist()):
            y, x = divmod(flat, mask.shape[1])
            masks, scores, _ = predictor.predict(
                point_coords=np.array([[x + 0.5, y + 0.5]]), point_labels=np.array([1]), multimask_output=True
            )
            pred = masks[int(np.argmax(scores))]
            union = np.logical_or(pred, mask).sum()
            ious.append(float(np.logical_and(pred, mask).sum() / union) if union else 1.0)
    return (float(np.mean(ious)) if ious else None), len(ious)


def export_weights(checkpoint: Path, out: Path) -> Path:
    """The SAM weights of a training checkpoint (LoRA merged) written in the official layout to `out`.

    The same steps as `samlight export`, done here so a round costs one subprocess, not two; the strict load
    that follows (`build_sam(..., checkpoint=out)`) checks every key.
    """
    state = load_state_dict(checkpoint)
    if has_lora(state):
        hparams = torch.load(checkpoint, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
        state = merge_lora(state, **(hparams.get("lora") or {}))
    return save_state_dict(state, out)


class Retrainer:
    """Runs fine-tuning rounds one at a time in a background thread (which drives the subprocesses).

    Args:
        engine: serves the model; receives the new weights.
        store: the annotations.
        output: the annotation output folder (rounds go to `output/retrain/`).
        weights: the file the served model was loaded from (the first round starts from it).
        variant: the served model's variant.
        settings: see RetrainSettings.
        command: how to call samlight (default: this Python running `-m samlight.cli.main`).
    """

    def __init__(
        self,
        engine: AnnotationEngine,
        store: AnnotationStore,
        output: str | os.PathLike,
        weights: str | os.PathLike,
        variant: str,
        settings: RetrainSettings | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.root = Path(output) / "retrain"
        self.root.mkdir(parents=True, exist_ok=True)
        self.history_path = self.root / "history.json"
        self.history: list[dict[str, Any]] = (
            json.loads(self.history_path.read_text()) if self.history_path.exists() else []
        )
        self.weights = Path(self.history[-1]["checkpoint"]) if self.history else Path(weights)
        self.variant = variant
        self.settings = settings or RetrainSettings()
        self.command = command or [sys.executable, "-m", "samlight.cli.main"]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None
        self._stopping = False
        self.state: dict[str, Any] = {"state": "idle"}

    # ---------------------------------------------------------------------------------------------- api

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {**self.state, "history": list(self.history), "every": self.settings.every}

    def start(self) -> tuple[bool, str]:
        """Start a round unless one runs; (started, reason)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return False, "a retrain round is already running"
            train, held = self._split()
            if not train:
                return False, "nothing to train on yet: accept masks on at least two images first"
            round_index = 1 + max(
                [
                    int(p.name.split("_")[1])
                    for p in self.root.glob("round_*")
                    if p.name.split("_")[1].isdigit()
                ],
                default=0,
            )
            self.state = {"state": "starting", "round": round_index, "started": time.time()}
            self._thread = threading.Thread(
                target=self._run, args=(round_index, train, held), name="samlight-retrain", daemon=True
            )
            self._thread.start()
            return True, f"round {round_index} started"

    def after_accept(self) -> None:
        """Start a round when --retrain-every new human masks have been accepted since the last one."""
        every = self.settings.every
        if not every:
            return
        done = self.history[-1]["human_masks"] if self.history else 0
        if self.store.counts()[HUMAN] - done >= every:
            self.start()

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def stop(self) -> None:
        """Terminate a running round (server shutdown)."""
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    # ---------------------------------------------------------------------------------------- the round

    def _split(self) -> tuple[list[str], list[str]]:
        human = self.store.annotated_images(HUMAN)
        _, held = heldout_split(human, self.settings.heldout_fraction)
        train = [i for i in self.store.annotated_images() if i not in held]
        return train, held

    def _set(self, **fields: Any) -> None:
        with self._lock:
            self.state = {**self.state, **fields}

    def _run(self, round_index: int, train: list[str], held: list[str]) -> None:
        directory = self.root / f"round_{round_index:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        started = time.time()
        try:
            human_masks = self.store.counts()[HUMAN]
            self._set(state="evaluating", phase="held-out mIoU before training")
            before, num_heldout = one_click_miou(self.engine.model, self.store, self.engine, held)
            self._set(
                state="training",
                miou_before=before,
                heldout_masks=num_heldout,
                log=str(directory / "fit.log"),
            )
            checkpoint = self._train(directory, train)
            self._set(state="evaluating", phase="held-out mIoU after training")
            model = build_sam(self.variant, checkpoint=checkpoint).eval()
            after, _ = one_click_miou(model, self.store, self.engine, held)
            encoder_changed = self.engine.swap_model(model, round_index)
            result = {
                "round": round_index,
                "checkpoint": str(checkpoint),
                "started_from": str(self.weights),
                "human_masks": human_masks,
                "train_images": len(train),
                "heldout_images": held,
                "heldout_masks": num_heldout,
                "miou_before": before,
                "miou_after": after,
                "encoder_changed": encoder_changed,
                "seconds": round(time.time() - started, 1),
            }
            atomic_write_bytes(directory / "result.json", json.dumps(result, indent=1).encode())
            with self._lock:
                self.history.append(result)
                self.weights = checkpoint
                atomic_write_bytes(self.history_path, json.dumps(self.history, indent=1).encode())
                self.state = {"state": "idle", "last": result}
            log.info(
                "samlight annotate: retrain round %d done: held-out 1-click mIoU %s -> %s",
                round_index,
                before,
                after,
            )
        except Exception as e:  # shown on the page; the server keeps serving the old weights
            log.exception("samlight annotate: retrain round %d failed", round_index)
            self._set(state="failed", error=f"{type(e).__name__}: {e}", log=str(directory / "fit.log"))

    def _train(self, directory: Path, train: list[str]) -> Path:
        """Run `samlight fit` for one round; returns its weights exported in the official layout."""
        base = directory / "base.yaml"
        base.write_text(
            yaml.safe_dump(base_config(self.variant, self.engine.model.image_size, self.settings.steps))
        )
        data = {
            "model": {"checkpoint": str(self.weights.resolve())},
            # The tool measures the held-out mIoU itself; a val set from the user's config would point elsewhere.
            "data": {
                "init_args": {
                    "train_urls": [str(self.store.shard_path(i).resolve()) for i in train],
                    "val_urls": None,
                }
            },
            "trainer": {
                "default_root_dir": str(directory.resolve()),
                "callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {
                            "dirpath": str((directory / "checkpoints").resolve()),
                            "save_last": True,
                        },
                    }
                ],
            },
        }
        (directory / "data.yaml").write_text(yaml.safe_dump(data))
        configs = [base, *([self.settings.config] if self.settings.config else []), directory / "data.yaml"]
        fit = [*self.command, "fit", *[a for c in configs for a in ("--config", str(c))]]
        self._call(fit, directory / "fit.log")
        checkpoints = sorted(
            (directory / "checkpoints").glob("*.ckpt"),
            key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime),
        )
        if not checkpoints:
            raise RuntimeError(
                f"samlight fit wrote no checkpoint in {directory / 'checkpoints'}; see {directory / 'fit.log'}"
            )
        return export_weights(checkpoints[0], directory / "sam.pth")

    def _call(self, args: list[str], log_path: Path) -> None:
        if self._stopping:
            raise RuntimeError("server is shutting down")
        with open(log_path, "a") as logfile:
            logfile.write("$ " + " ".join(args) + "\n")
            logfile.flush()
            self._process = subprocess.Popen(args, stdout=logfile, stderr=subprocess.STDOUT)
            rc = self._process.wait()
        if rc != 0:
            tail = log_path.read_text().splitlines()[-15:]
            raise RuntimeError(
                f"{' '.join(args[:4])} ... exited with status {rc}; last lines of {log_path}:\n"
                + "\n".join(tail)
            )
