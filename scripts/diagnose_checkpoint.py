"""Where a trained checkpoint's 1-click masks go wrong: the figures behind docs/training.md#what-06-takes.

    python scripts/diagnose_checkpoint.py runs/quickstart/version_0/checkpoints/last.ckpt

On the demo set's held-out (and training) images, with a centre click and the IoU head's choice, as the
quickstart's validation measures it, it prints:
  - the 1-click mIoU on held-out and on training images (a gap means overfitting);
  - the mIoU when each image's prompts are decoded with another image's embedding (what the masks owe to the
    click position alone, not to the image);
  - the share of wrong pixels that lie in encoder patches an object boundary crosses.
"""

from __future__ import annotations

import argparse
from itertools import islice

import torch
import torch.nn.functional as F
from torch import Tensor


def boundary_error_share(pred: Tensor, gt: Tensor, patch: int) -> float:
    """Fraction of the wrong pixels (pred xor gt, N x S x S bool) inside patches that gt covers only in part."""
    cover = F.avg_pool2d(gt.float()[:, None], patch)[:, 0]  # N x S/p x S/p
    mixed = ((cover > 0) & (cover < 1)).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    wrong = pred ^ gt
    total = int(wrong.sum())
    return float((wrong & mixed).sum()) / total if total else 0.0


@torch.no_grad()
def diagnose(module, loader, num_batches: int) -> dict[str, float]:
    """1-click mIoU with the image's own embedding and with the next image's, and the boundary error share."""
    from samlight.prompts.base import PromptContext
    from samlight.prompts.point import PointPrompt
    from samlight.training.episode import binarize, select_output
    from samlight.training.metrics import mask_iou
    from samlight.training.module import _valid_slots

    model = module.model

    def chosen_mask(embeddings: Tensor, image_index: Tensor, prompts, size: int) -> Tensor:
        logits, iou = model.decode(embeddings, image_index, prompts, True)
        return binarize(select_output(logits, iou.argmax(1)), size)  # N x S x S, the IoU head's choice

    own, other, preds, gts = [], [], [], []
    for batch in islice(loader, num_batches):
        gt, image_index, _ = _valid_slots(batch)  # N x S x S, N
        context = PromptContext(
            images=batch.images, image_index=image_index, input_sizes=batch.input_sizes, text_embeddings=None
        )
        prompts = PointPrompt(mode="center").sample(gt, context=context)
        embeddings = model.encode_images(batch.images)
        pred = chosen_mask(embeddings, image_index, prompts, gt.shape[-1])
        own.append(mask_iou(pred, gt))
        other.append(mask_iou(chosen_mask(embeddings.roll(1, 0), image_index, prompts, gt.shape[-1]), gt))
        preds.append(pred)
        gts.append(gt)
    patch = model.image_size // model.prompt_encoder.image_embedding_size[0]
    return {
        "miou": float(torch.cat(own).mean()),
        "miou_other_image": float(torch.cat(other).mean()),
        "boundary_error_share": boundary_error_share(torch.cat(preds), torch.cat(gts), patch),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a Lightning .ckpt written by samlight fit")
    parser.add_argument("--urls", default="demo", help="shards to read (default: the demo set)")
    parser.add_argument("--batches", type=int, default=4, help="batches of 2 images per split (default 4)")
    args = parser.parse_args(argv)

    from samlight.datamodules import SA1BDataModule
    from samlight.datamodules.urls import expand_urls
    from samlight.training.module import SamModule

    module = SamModule.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True).eval()

    def loader(split: str):
        # Both splits decoded as validation decodes (first masks, input frame, no randomness).
        urls = expand_urls(args.urls, split=split)
        data = SA1BDataModule(
            train_urls=urls, val_urls=urls, image_size=module.model.image_size, batch_size=2, num_workers=0
        )
        data.setup("validate")
        return data.val_dataloader()

    held_out = diagnose(module, loader("val"), args.batches)
    seen = diagnose(module, loader("train"), args.batches)
    print(f"1-click mIoU, held-out images: {held_out['miou']:.3f}   training images: {seen['miou']:.3f}")
    print(f"1-click mIoU with another image's embedding (held-out): {held_out['miou_other_image']:.3f}")
    print(
        f"wrong pixels in patches an object boundary crosses (held-out): {held_out['boundary_error_share']:.0%}"
    )


if __name__ == "__main__":
    main()
