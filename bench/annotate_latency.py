"""Click-to-mask latency of `samlight annotate` (server-side decoder), against the official SamPredictor and an
ONNX decoder in onnxruntime, same weights, same image, same run.

What is timed, after the image embedding exists (it is cached once per image):
- server: the whole /api/predict handler through Flask's test client: JSON in, prompt encoder + mask decoder,
  upsampling to the original size, stability scores, COCO RLE of every candidate, JSON out;
- official: `segment_anything.SamPredictor.predict` on the same embedding (the baseline: decoder + upsampling
  only, no encoding of the answer);
- onnx: the official `SamOnnxModel` decoder exported with torch.onnx and run by onnxruntime on the CPU (what the
  official demo runs in the browser via onnxruntime-web, whose WebAssembly backend is slower than native
  onnxruntime, so this is a lower bound on the in-browser decode), plus the bytes the browser would need.

Prompts: one click (3 candidates) and three clicks with the previous mask fed back (1 mask). Weights are random
(no download): latency does not depend on their values.

    python bench/annotate_latency.py --variants tiny vit_b --size 1500 2250 [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CPU_MS: dict[int, float] = {}  # id(fn) -> median CPU ms, filled by _median_ms


def _median_ms(fn, repeats: int) -> float:
    """Median wall-clock ms of `fn()`; the median CPU ms (all threads of this process) goes to CPU_MS[id(fn)].

    On a shared, loaded machine the wall clock includes waiting for a core; with one thread (`--threads 1`) the
    CPU time is the work itself, what an idle core would need (with more threads it also counts the time
    threads spin waiting for each other)."""
    fn()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    CPU_MS[id(fn)] = statistics.median(cpu) * 1000
    return statistics.median(times) * 1000


def _timed(out: dict, name: str, fn, repeats: int) -> None:
    out[f"{name}_ms"] = _median_ms(fn, repeats)
    out[f"{name}_cpu_ms"] = CPU_MS[id(fn)]


def _onnx_decoder(official_sam, folder: Path):
    """Export the official ONNX decoder (single-mask output, as the demo) and open an onnxruntime session."""
    import onnxruntime as ort
    from segment_anything.utils.onnx import SamOnnxModel

    onnx_model = SamOnnxModel(official_sam, return_single_mask=True)
    embed = official_sam.prompt_encoder.embed_dim
    grid = official_sam.prompt_encoder.image_embedding_size
    low = [4 * x for x in grid]
    inputs = {
        "image_embeddings": torch.randn(1, embed, *grid),
        "point_coords": torch.randint(0, 1024, (1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(0, 4, (1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *low),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    path = folder / "decoder.onnx"
    torch.onnx.export(
        onnx_model,
        tuple(inputs.values()),
        str(path),
        input_names=list(inputs),
        output_names=["masks", "iou_predictions", "low_res_masks"],
        dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
        opset_version=17,
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch, for a fair CPU time
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, path.stat().st_size


def bench_variant(variant: str, size: tuple[int, int], repeats: int, onnx: bool) -> dict:
    from segment_anything import SamPredictor as OfficialPredictor
    from segment_anything import sam_model_registry

    import samlight
    from samlight.cli.annotate import _parser, build_session
    from samlight.inference.annotate.server import create_app

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = samlight.build_sam(variant).eval()
        samlight.save_official(model, tmp / "sam.pth")
        del model
        (tmp / "images").mkdir()
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp / "images" / "photo.png")
        args = _parser().parse_args(
            [
                "--checkpoint",
                str(tmp / "sam.pth"),
                "--images",
                str(tmp / "images"),
                "--output",
                str(tmp / "out"),
            ]
        )
        engine, store, retrainer = build_session(args)
        client = create_app(engine, store, retrainer).test_client()
        start = time.perf_counter()
        client.post("/api/open", json={"image": "photo.png"})
        embed_s = time.perf_counter() - start
        h, w = size
        one = {"image": "photo.png", "points": [[w * 0.4, h * 0.5, 1]]}
        first = client.post("/api/predict", json=one).json
        three = {
            "image": "photo.png",
            "points": [[w * 0.4, h * 0.5, 1], [w * 0.6, h * 0.5, 1], [w * 0.1, h * 0.1, 0]],
            "previous": first["prediction"],
            "candidate": first["best"],
        }
        low = engine.get_prediction(first["prediction"]).low_res_logits[first["best"] : first["best"] + 1]
        # 3 clicks first: `previous` must still be among the engine's kept predictions (the last 32).
        out = {"variant": variant, "embed_s": embed_s}
        _timed(out, "server_3click", lambda: client.post("/api/predict", json=three), repeats)
        _timed(out, "server_1click", lambda: client.post("/api/predict", json=one), repeats)
        out["response_bytes_1click"] = len(client.post("/api/predict", json=one).data)
        # Baseline: the official predictor on the same weights and the same embedding.
        official = sam_model_registry[variant if variant != "tiny" else "vit_b"]
        if variant == "tiny":  # the official registry has no tiny; its decoder is samlight's, so skip
            official_sam = None
        else:
            official_sam = official(checkpoint=str(tmp / "sam.pth")).eval()
        if official_sam is not None:
            predictor = OfficialPredictor(official_sam)
            predictor.original_size = size
            predictor.input_size = engine.input_size(size)
            predictor.features = engine.embedding("photo.png")
            predictor.is_image_set = True
            point = np.array([[w * 0.4, h * 0.5]])
            _timed(
                out,
                "official_1click",
                lambda: predictor.predict(point_coords=point, point_labels=np.array([1])),
                repeats,
            )
            points = np.array([[w * 0.4, h * 0.5], [w * 0.6, h * 0.5], [w * 0.1, h * 0.1]])
            _timed(
                out,
                "official_3click",
                lambda: predictor.predict(
                    point_coords=points,
                    point_labels=np.array([1, 1, 0]),
                    mask_input=low,
                    multimask_output=False,
                ),
                repeats,
            )
            if onnx:
                session, onnx_bytes = _onnx_decoder(official_sam, tmp)
                coords = predictor.transform.apply_coords(np.concatenate([points, [[0.0, 0.0]]]), size)
                feed = {
                    "image_embeddings": engine.embedding("photo.png").numpy(),
                    "point_coords": coords[None].astype(np.float32),
                    "point_labels": np.array([[1, 1, 0, -1]], np.float32),
                    "mask_input": low[None].astype(np.float32),
                    "has_mask_input": np.array([1], np.float32),
                    "orig_im_size": np.array(size, np.float32),
                }
                _timed(out, "onnx_3click", lambda: session.run(None, feed), repeats)
                out["onnx_model_bytes"] = onnx_bytes
                out["embedding_bytes"] = engine.embedding("photo.png").numpy().nbytes
        engine.close()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--size", nargs=2, type=int, default=[1500, 2250], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores "
        f"(load average {load:.1f}), image {args.size[0]} x {args.size[1]}"
    )
    for variant in args.variants:
        r = bench_variant(variant, tuple(args.size), args.repeats, not args.no_onnx)
        line = (
            f"{variant}: embedding {r['embed_s']:.2f} s once per image; click-to-mask (server, median of "
            f"{args.repeats}): 1 click / 3 candidates {r['server_1click_ms']:.1f} ms, 3 clicks + mask "
            f"{r['server_3click_ms']:.1f} ms (CPU time {r['server_1click_cpu_ms']:.1f} / {r['server_3click_cpu_ms']:.1f} ms); "
            f"answer {r['response_bytes_1click'] / 1024:.1f} KiB"
        )
        if "official_1click_ms" in r:
            line += (
                f"\n  official SamPredictor.predict: {r['official_1click_ms']:.1f} / {r['official_3click_ms']:.1f} ms"
                f" (CPU {r['official_1click_cpu_ms']:.1f} / {r['official_3click_cpu_ms']:.1f} ms)"
                f" -> server / official = {r['server_1click_ms'] / r['official_1click_ms']:.2f}x / "
                f"{r['server_3click_ms'] / r['official_3click_ms']:.2f}x"
            )
        if "onnx_3click_ms" in r:
            line += (
                f"\n  ONNX decoder (onnxruntime CPU, 3 clicks + mask): {r['onnx_3click_ms']:.1f} ms "
                f"(CPU {r['onnx_3click_cpu_ms']:.1f} ms) -> server / onnx "
                f"= {r['server_3click_ms'] / r['onnx_3click_ms']:.2f}x; the browser would first download "
                f"{r['onnx_model_bytes'] / 2**20:.1f} MiB of decoder and {r['embedding_bytes'] / 2**20:.1f} MiB "
                "of embedding per image"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
