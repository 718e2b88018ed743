"""ONNX decoder (prompt encoder + mask decoder + upscaling, official interface) under onnxruntime on CPU against
`samlight.SamPredictor.predict`, same weights, same run; and the uint8-quantised graph's size and agreement.

Uses the decoder of every official variant (prompt dim 256, 8 heads, MLP 2048, 64 x 64 embedding) with random
weights; only the decoder is timed, so the image encoder is the tiny one (its embedding is computed once).
Both paths return masks at the original image size (the predictor's `predict` includes that upscaling too).
Prints the median latency per prompt (one foreground point), the ratio, file sizes and the mask IoU of the
quantised graph against the float one over a set of prompts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from samlight import SamPredictor, build_sam
from samlight.inference.onnx_export import export_decoder
from samlight.modeling.transforms import apply_coords


def _feed(predictor: SamPredictor, xy: np.ndarray) -> dict[str, np.ndarray]:
    """One foreground point plus the official (0, 0) padding point labelled -1."""
    coords = apply_coords(
        np.concatenate([xy, [[0.0, 0.0]]]), predictor.original_size, predictor.model.image_size
    )
    return {
        "image_embeddings": predictor.features.numpy(),
        "point_coords": coords[None].astype(np.float32),
        "point_labels": np.array([[1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(predictor.original_size, np.float32),
    }


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    sam = build_sam(
        "tiny",
        image_size=1024,
        encoder_img_size=1024,
        prompt_embed_dim=256,
        decoder_num_heads=8,
        decoder_mlp_dim=2048,
        iou_head_hidden_dim=256,
    ).eval()
    with torch.no_grad():  # random weights at a ViT-like scale, so masks are not all-background
        for name, t in sam.state_dict().items():
            if name.endswith("positional_encoding_gaussian_matrix"):
                t.normal_()
            elif t.ndim == 1 and name.endswith("weight"):
                t.normal_(1.0, 0.1)
            else:
                t.normal_(0.0, 0.05)
    predictor = SamPredictor(sam)
    rng = np.random.default_rng(0)
    predictor.set_image(rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8))

    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "float": export_decoder(sam, Path(tmp) / "decoder.onnx"),
            "uint8": export_decoder(sam, Path(tmp) / "decoder.quant.onnx", quantize=True),
        }
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions = {
            k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for k, p in paths.items()
        }
        sizes = {k: p.stat().st_size / 2**20 for k, p in paths.items()}

        xy = np.array([[args.width * 0.4, args.height * 0.6]])
        feed = _feed(predictor, xy)
        ours, _, _ = sessions["float"].run(None, feed)
        want, _, _ = predictor.predict(xy, np.array([1]), multimask_output=True, return_logits=True)
        diff = float(np.abs(ours[0, 1:] - want).max())

        t_pred = _median(lambda: predictor.predict(xy, np.array([1]), multimask_output=True), args.repeats)
        t_onnx = {k: _median(lambda s=s: s.run(None, feed), args.repeats) for k, s in sessions.items()}

        ious = []
        for _ in range(20):
            f = _feed(predictor, rng.uniform([0, 0], [args.width, args.height], (1, 2)))
            full, quant = (sessions[k].run(None, f)[0][0] > 0 for k in ("float", "uint8"))
            ious.extend((full & quant).sum((1, 2)) / np.maximum((full | quant).sum((1, 2)), 1))

    print(f"image {args.height}x{args.width}, {args.threads} thread(s), median of {args.repeats}")
    print(f"ONNX float vs SamPredictor: max |logit diff| {diff:.2e}")
    print(f"SamPredictor.predict    {t_pred * 1e3:7.1f} ms / prompt")
    for k, t in t_onnx.items():
        print(f"onnxruntime {k:<6}      {t * 1e3:7.1f} ms / prompt  ({t_pred / t:.2f}x SamPredictor)")
    print(
        f"file size float {sizes['float']:.1f} MiB, uint8 {sizes['uint8']:.1f} MiB ({sizes['uint8'] / sizes['float']:.2f}x)"
    )
    print(f"uint8 vs float masks (20 prompts x 4 outputs): IoU min {min(ious):.3f}, mean {np.mean(ious):.3f}")


if __name__ == "__main__":
    main()
