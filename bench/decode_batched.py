"""Batched mask decoding (`Sam.decode`) against the official per-image decoder path, same weights, same run.

The training hot path decodes many prompts over several images each round (64 masks x 11 rounds per image).
The baseline is what `segment_anything.modeling.Sam.forward` does: one mask-decoder call per image, the image
embedding repeated per prompt (`repeat_interleave`), the "no mask" dense embedding and the positional encoding
materialised for every prompt. Both use the vit_b decoder (C=256, 64 x 64 embedding) with identical weights,
and the outputs are checked to agree before timing. Prints the median time of forward + backward and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from segment_anything.modeling import MaskDecoder as OfficialMaskDecoder
from segment_anything.modeling import PromptEncoder as OfficialPromptEncoder
from segment_anything.modeling import TwoWayTransformer as OfficialTwoWayTransformer

from samlight import build_sam
from samlight.prompts.types import Prompts


def _official_parts(sam) -> tuple[torch.nn.Module, torch.nn.Module]:
    pe = OfficialPromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
    )
    md = OfficialMaskDecoder(
        transformer_dim=256,
        transformer=OfficialTwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    pe.load_state_dict(sam.prompt_encoder.state_dict(), strict=True)
    md.load_state_dict(sam.mask_decoder.state_dict(), strict=True)
    return pe, md


def _official_decode(pe, md, emb, coords, labels, per_image):
    """Official Sam.forward's loop: one decoder call per image."""
    logits, ious = [], []
    for b in range(emb.shape[0]):
        rows = slice(b * per_image, (b + 1) * per_image)
        sparse, dense = pe(points=(coords[rows], labels[rows]), boxes=None, masks=None)
        out, iou = md(
            image_embeddings=emb[b : b + 1],
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        logits.append(out)
        ious.append(iou)
    return torch.cat(logits), torch.cat(ious)


def _time(fns, repeats: int) -> list[float]:
    """Median CPU seconds (process time: the machine is shared) of forward + backward, runs interleaved."""
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        for fn, acc in zip(fns, times):
            start = time.process_time()
            logits, iou = fn()
            (logits.square().mean() + iou.mean()).backward()
            if r:  # the first round warms up allocators
                acc.append(time.process_time() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--prompts-per-image", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = build_sam("vit_b").state_dict()
    sam = build_sam("vit_b")  # random init; only the decoder side is timed
    pe, md = _official_parts(sam)
    b, k = args.images, args.prompts_per_image
    emb = torch.randn(b, 256, 64, 64, requires_grad=True)
    coords = torch.rand(b * k, 1, 2) * 1024
    labels = torch.ones(b * k, 1, dtype=torch.long)
    index = torch.arange(b).repeat_interleave(k)
    prompts = Prompts(point_coords=coords, point_labels=labels)

    ours = lambda: sam.decode(emb, index, prompts, multimask_output=True)  # noqa: E731
    baseline = lambda: _official_decode(pe, md, emb, coords, labels, k)  # noqa: E731
    with torch.no_grad():
        diff = (ours()[0] - baseline()[0]).abs().max() / baseline()[0].abs().max()
    assert diff < 1e-4, f"outputs differ: {diff}"
    t_base, t_ours = _time([baseline, ours], args.repeats)
    print(
        f"decoder parameters: {sum(v.numel() for k_, v in shapes.items() if k_.startswith('mask_decoder.')) / 1e6:.1f} M"
    )
    print(
        f"{b} images x {k} prompts, forward + backward, CPU time, median of {args.repeats}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"official per-image path: {t_base * 1e3:.0f} ms")
    print(f"samlight Sam.decode:     {t_ours * 1e3:.0f} ms   ({t_base / t_ours:.2f}x)")
    print(f"max relative output difference: {diff:.1e}")


if __name__ == "__main__":
    main()
