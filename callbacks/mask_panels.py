"""`MaskPanels`: show the masks, not only the numbers — GT vs. prediction after the first prompt and the last click.

At each validation (and every `every_n_steps` training steps) a few fixed images are segmented interactively with
`SamModule.interact` (the paper's evaluation clicks) and logged as W&B images with ground-truth and prediction mask
layers, as TensorBoard images (one three-tile sheet per image: ground truth | first prompt | last click) when a
TensorBoardLogger is configured, and written as PNG files under `<run dir>/panels/step_<k>/` when the run does not
log to W&B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from samlight.callbacks.panel_render import Panel, denormalize, panel_png, panels_from_trace
from samlight.datamodules.batch import SegmentationBatch
from samlight.training.run_layout import run_dir


class MaskPanels(Callback):
    """Log mask panels for a few fixed images.

    Args:
        every_n_steps: also log every N training steps (None or 0: only at validation).
        num_images: how many images of the first validation batch to show (0 turns the panels off).
        prompts: first-prompt types to show, one panel row each (names `SamModule.interact` accepts).
        num_clicks: corrective clicks after the first prompt ("center" mode, as in the paper's evaluation).
        max_masks_per_image: masks prompted per image; a few keep the panel readable and cheap.
        max_side: longest side of a logged image in pixels (larger inputs are scaled down).
        out_dir: write PNG panels here (also when logging to W&B); default `<run dir>/panels` without W&B.
        seed: seed of the generator passed to `interact`, so panels are comparable across steps.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        num_images: int = 4,
        prompts: Sequence[str] = ("point", "box"),
        num_clicks: int = 8,
        max_masks_per_image: int | None = 8,
        max_side: int = 512,
        out_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if num_images < 0 or num_clicks < 0:
            raise ValueError(
                f"MaskPanels: num_images ({num_images}) and num_clicks ({num_clicks}) must be >= 0"
            )
        self.every_n_steps = every_n_steps or 0
        self.num_images = num_images
        self.prompts = tuple(prompts)
        self.num_clicks = num_clicks
        self.max_masks_per_image = max_masks_per_image
        self.max_side = max_side
        self.out_dir = out_dir
        self.seed = seed
        self._batch: SegmentationBatch | None = None
        self._from_validation = False
        self._last_logged: tuple[int, bool] | None = None
        self._disabled = num_images == 0
        self._missing_prompts: set[str] = set()
        self._last_png_dir: Path | None = None

    # -- choosing the images -------------------------------------------------------------------------------

    def _cache(self, batch: Any, *, from_validation: bool) -> None:
        """Keep the first `num_images` images of a batch on the CPU (validation images replace training ones)."""
        if not isinstance(batch, SegmentationBatch):
            return
        if self._batch is not None and (self._from_validation or not from_validation):
            return
        self._batch = _head(batch, self.num_images)
        self._from_validation = from_validation

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._disabled and batch_idx == 0 and dataloader_idx == 0:
            self._cache(batch, from_validation=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The sanity check runs before any training: the first real validation shows the same images.
        if not self._disabled and not trainer.sanity_checking:
            self.log_panels(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._disabled or not self.every_n_steps:
            return
        # Before the first validation, the first training batch stands in (documented in docs/dashboards.md).
        self._cache(batch, from_validation=False)
        if trainer.global_step % self.every_n_steps == 0:
            self.log_panels(trainer, pl_module)

    # -- rendering and logging -----------------------------------------------------------------------------

    def log_panels(self, trainer: Trainer, pl_module: LightningModule) -> list[Panel]:
        """Run the interaction on the cached images and log the panels; returns them (empty on non-zero ranks).

        Every rank runs the interaction: under FSDP a forward pass is a collective, so rank zero cannot run it alone.
        """
        step = trainer.global_step
        # Once per step and image set; validation images replacing the training stand-ins are shown again.
        if (step, self._from_validation) == self._last_logged:
            return []
        # All ranks or none: a rank that saw no validation batch must not leave the others in a collective.
        if not trainer.strategy.reduce_boolean_decision(self._batch is not None, all=True):
            return []
        if not hasattr(pl_module, "interact"):
            rank_zero_warn(
                f"MaskPanels: {type(pl_module).__name__} has no `interact` method; panels are off."
            )
            self._disabled = True
            return []
        self._last_logged = (step, self._from_validation)
        traces = self._interact(trainer, pl_module)
        if not trainer.is_global_zero:
            return []
        images = denormalize(self._batch.images, self._batch.input_sizes)
        panels = [p for trace in traces for p in panels_from_trace(trace, images, max_side=self.max_side)]
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_logger is not None:
            _log_wandb(wandb_logger, panels, step)
        for tb_logger in (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)):
            _log_tensorboard(tb_logger, panels, step)
        if wandb_logger is None or self.out_dir is not None:
            root = Path(self.out_dir) if self.out_dir is not None else run_dir(trainer) / "panels"
            _write_pngs(root / f"step_{step}", panels)
            self._last_png_dir = root / f"step_{step}"
        return panels

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last thing a first run prints: where to look at the masks it learnt.
        if trainer.is_global_zero and self._last_png_dir is not None:
            count = len(list(self._last_png_dir.glob("*.png")))
            print(
                f"samlight: mask panels ({count} PNGs: ground truth | first prompt | last click) in {self._last_png_dir}"
            )

    def _interact(self, trainer: Trainer, pl_module: LightningModule) -> list[Any]:
        batch = self._batch.to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        traces = []
        try:
            # The trainer's precision context (e.g. bf16 autocast) so panels show what validation measures.
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for prompt in [p for p in self.prompts if p not in self._missing_prompts]:
                    generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
                    try:
                        trace = pl_module.interact(
                            batch,
                            prompt=prompt,
                            num_clicks=self.num_clicks,
                            mode="center",
                            max_masks_per_image=self.max_masks_per_image,
                            generator=generator,
                        )
                    except KeyError as err:  # a prompt type this model is not configured with
                        rank_zero_warn(f"MaskPanels: no panels for prompt {prompt!r}: {err}")
                        self._missing_prompts.add(prompt)
                        continue
                    traces.append(trace)
        finally:
            pl_module.train(was_training)
        return traces


def _head(batch: SegmentationBatch, n: int) -> SegmentationBatch:
    """The first n images of a batch, copied to the CPU (so the cache holds no device memory)."""
    cut = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            cut[f.name] = value[:n].detach().to("cpu", copy=True)
        elif f.name == "meta":
            cut[f.name] = list(value[:n])
    return replace(batch, **cut)


def _mask_layers(panel: Panel, prediction) -> dict[str, dict[str, Any]]:
    class_labels = {k: f"mask {k}" for k in range(1, int(max(panel.gt.max(), prediction.max())) + 1)}
    class_labels[0] = "background"
    return {
        "ground_truth": {"mask_data": panel.gt, "class_labels": class_labels},
        "prediction": {"mask_data": prediction, "class_labels": class_labels},
    }


def _log_wandb(logger: WandbLogger, panels: list[Panel], step: int) -> None:
    """One key per prompt type and stage: `panels/<prompt>/first_prompt` and `panels/<prompt>/last_click`."""
    for prompt in dict.fromkeys(p.prompt_name for p in panels):
        # W&B shows a list of images correctly only when all have one size: pad bottom-right to the largest.
        rows = _pad_to_common_size([p for p in panels if p.prompt_name == prompt])
        logger.log_image(
            key=f"panels/{prompt}/first_prompt",
            images=[p.first_drawn for p in rows],
            step=step,
            masks=[_mask_layers(p, p.first) for p in rows],
            caption=[p.caption("first") for p in rows],
        )
        logger.log_image(
            key=f"panels/{prompt}/last_click",
            images=[p.last_drawn for p in rows],
            step=step,
            masks=[_mask_layers(p, p.last) for p in rows],
            caption=[p.caption("last") for p in rows],
        )


def _log_tensorboard(logger: TensorBoardLogger, panels: list[Panel], step: int) -> None:
    """One image per panel, tag `panels/<prompt>/image<i>`: the PNG sheet (ground truth | first prompt | last
    click, prompts and clicks drawn, mIoU in the captions), so TensorBoard's step slider shows it improve."""
    writer = logger.experiment
    for panel in panels:
        sheet = np.asarray(panel_png(panel).convert("RGB"))  # H x W x 3 uint8
        writer.add_image(
            f"panels/{panel.prompt_name}/image{panel.image_index}", sheet, step, dataformats="HWC"
        )
    writer.flush()  # panels are few and large: on disk now, not at the writer's next periodic flush


def _pad_to_common_size(panels: list[Panel]) -> list[Panel]:
    h = max(p.image.shape[0] for p in panels)
    w = max(p.image.shape[1] for p in panels)

    def pad(a: np.ndarray) -> np.ndarray:
        widths = [(0, h - a.shape[0]), (0, w - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return np.pad(a, widths)

    return [
        replace(
            p,
            **{
                name: pad(getattr(p, name))
                for name in ("image", "gt", "first", "last", "first_drawn", "last_drawn")
            },
        )
        for p in panels
    ]


def _write_pngs(directory: Path, panels: list[Panel]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for panel in panels:
        panel_png(panel).save(directory / f"{panel.prompt_name}_image{panel.image_index}.png")
