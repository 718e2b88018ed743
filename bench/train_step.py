"""Training-step time: samlight's vectorised interactive step vs a per-mask, per-round Python loop.

Both sides run the same model, prompts, clicks and loss on the same batch, forward + backward:
  samlight   SamModule.training_step: encoder once, every round decodes all masks of the batch in one call.
  baseline   the straightforward way: for each mask, for each round, the official-signature prompt encoder and
             mask decoder on that one mask (image embedding repeated per call), clicks sampled per mask.
Also reported: the rounds' overhead over the bare decoder compute (rounds x one batched decode with fixed
prompts, forward + backward), i.e. what click sampling, feedback and the loss add.

    OMP_NUM_THREADS=1 python bench/train_step.py     # tiny (256 px, 4 x 16 masks, 11 rounds) and vit_b (reduced)
    python bench/train_step.py --variants tiny --repeats 5
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F

from samlight.datamodules.batch import SegmentationBatch
from samlight.prompts import CorrectiveClicks, PointPrompt
from samlight.training.loss import SamLoss
from samlight.training.module import SamModule

# variant -> (images, masks per image, corrective clicks, mask-only rounds)
SETTINGS = {"tiny": (4, 16, 8, 2), "vit_b": (1, 8, 2, 0)}


def make_batch(b: int, m: int, size: int, seed: int = 0) -> SegmentationBatch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    masks = torch.zeros(b, m, size, size, dtype=torch.bool)
    for i in range(b):
        for j in range(m):
            y, x = torch.randint(0, size * 3 // 4, (2,), generator=g).tolist()
            h, w = torch.randint(size // 16, size // 4, (2,), generator=g).tolist()
            masks[i, j, y : y + h, x : x + w] = True
    return SegmentationBatch(
        images=images,
        masks=masks,
        mask_valid=torch.ones(b, m, dtype=torch.bool),
        original_sizes=torch.full((b, 2), size),
        input_sizes=torch.full((b, 2), size),
    )


def samlight_step(module: SamModule, batch: SegmentationBatch) -> None:
    module.training_step(batch, 0).backward()


def baseline_step(module: SamModule, batch: SegmentationBatch, clicks: CorrectiveClicks) -> None:
    """One mask and one round at a time through the official call signatures."""
    model, loss_fn = module.model, SamLoss()
    embeddings = model.encode_images(batch.images)
    point = PointPrompt()
    total = 0.0
    for b in range(batch.images.shape[0]):
        for j in range(batch.masks.shape[1]):
            gt = batch.masks[b, j][None]  # 1 x S x S
            target = F.avg_pool2d(gt[:, None].float(), 4)[:, 0]
            prompts = point.sample(gt)
            coords, labels, mask_input = prompts.point_coords, prompts.point_labels, None
            multimask = True
            best = torch.zeros(1, 1, *target.shape[-2:])  # replaced by round 0's output before any click
            for r in range(1 + clicks.num_clicks + clicks.mask_only_rounds):
                if 0 < r <= clicks.num_clicks:
                    xy, lab = clicks.next_clicks(target >= 0.5, best[:, 0] > 0)
                    coords = torch.cat([coords, (xy + 0.5) * 4 - 0.5], 1)
                    labels = torch.cat([labels, lab], 1)
                sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_input)
                logits, iou = model.mask_decoder(
                    image_embeddings=embeddings[b : b + 1],
                    image_pe=model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
                total = total + loss_fn(logits, iou, target, torch.ones(1)).loss
                best = logits.gather(1, iou.argmax(1)[:, None, None, None].expand(-1, 1, *logits.shape[-2:]))
                mask_input, multimask = best.detach(), False
    total.backward()


def bare_decoder(module: SamModule, batch: SegmentationBatch, embeddings: torch.Tensor, rounds: int) -> None:
    """rounds x one batched decode over all masks with fixed prompts, forward + backward, no clicks or loss.

    `embeddings` (B x C x h x w) are computed once outside the timing, so only decoder compute is measured.
    """
    model = module.model
    b, m = batch.mask_valid.shape
    gt = batch.masks.flatten(0, 1)
    image_index = torch.arange(b).repeat_interleave(m)
    prompts = PointPrompt().sample(gt)
    feedback = torch.zeros(gt.shape[0], 1, gt.shape[-1] // 4, gt.shape[-1] // 4)
    total = 0.0
    for r in range(rounds):
        p = prompts if r == 0 else replace(prompts, mask_inputs=feedback)
        logits, iou = model.decode(embeddings, image_index, p, multimask_output=r == 0)
        total = total + logits.float().mean() + iou.float().mean()
    total.backward()


def encoder_only(module: SamModule, batch: SegmentationBatch) -> None:
    module.model.encode_images(batch.images).float().mean().backward()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        # CPU time, not wall time: the benchmark machine is shared, and with one thread CPU time is the compute.
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return sorted(times)[len(times) // 2]


def run(variant: str, repeats: int) -> None:
    b, m, num_clicks, mask_only = SETTINGS[variant]
    clicks = CorrectiveClicks(num_clicks=num_clicks, mask_only_rounds=mask_only)
    rounds = 1 + num_clicks + mask_only
    module = SamModule(variant=variant, prompts=[PointPrompt()], clicks=clicks)
    batch = make_batch(b, m, module.model.image_size)
    module.zero_grad(set_to_none=True)
    t_samlight = timed(lambda: samlight_step(module, batch), repeats)
    t_baseline = timed(lambda: baseline_step(module, batch, clicks), repeats)
    t_encoder = timed(lambda: encoder_only(module, batch), repeats)
    with torch.no_grad():
        embeddings = module.model.encode_images(batch.images)
    t_bare = timed(lambda: bare_decoder(module, batch, embeddings, rounds), repeats)
    device = "cpu"
    print(
        f"{variant:6s} {device}: {b} img x {m} masks x {rounds} rounds | samlight {t_samlight:.3f} CPU-s/step | "
        f"per-mask loop {t_baseline:.3f} CPU-s/step | speed-up x{t_baseline / t_samlight:.1f} | "
        f"encoder {t_encoder:.3f} s | bare decoder {t_bare:.3f} s | rounds overhead "
        f"x{(t_samlight - t_encoder) / t_bare:.2f} of bare decoder compute",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU time is measured)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*self.trainer")  # training_step logs outside a Trainer here
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, no GPU used")
    for variant in args.variants:
        run(variant, args.repeats)


if __name__ == "__main__":
    main()
