"""`samlight annotate`: the browser tool for assisted-manual annotation, with the model retrained in the loop.

    samlight annotate --checkpoint sam_vit_b_01ec64.pth --images my_images/ --output my_annotations/

Opens http://127.0.0.1:8000; accepted masks land in `OUTPUT/shards/*.tar` (SA-1B format, "source": "human"),
which `samlight fit` reads as they are. See docs/annotate.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samlight annotate",
        description="Annotate images in the browser with SAM: click, accept, and retrain the model on what you "
        "annotated. Accepted masks are saved at once as SA-1B shards in OUTPUT/shards/.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="SAM weights: official .pth, Lightning .ckpt, safetensors"
    )
    p.add_argument("--images", required=True, help="folder of images to annotate (searched recursively)")
    p.add_argument("--output", required=True, help="folder for shards/, session.json, embeddings/, retrain/")
    p.add_argument("--variant", default=None, help="model variant (default: inferred from the checkpoint)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--existing",
        action="append",
        default=[],
        metavar="URLS",
        help="earlier annotations to load and correct, e.g. the shards of `samlight data annotate` "
        "(brace patterns / globs; repeatable)",
    )
    p.add_argument(
        "--retrain-every",
        type=int,
        default=None,
        metavar="N",
        help="fine-tune the model by itself after every N newly accepted masks (default: only from the button)",
    )
    p.add_argument(
        "--retrain-config",
        default=None,
        help="fine-tune config merged over the built-in one (e.g. a configs/finetune_*.yaml); the shards, "
        "starting weights and run folder of each round are set by the tool",
    )
    p.add_argument("--retrain-steps", type=int, default=200, help="training steps of the built-in config")
    return p


def _load_model(checkpoint: str, variant: str | None):
    from samlight.modeling.build import VARIANTS, build_sam
    from samlight.modeling.checkpoint import infer_variant, load_state_dict

    if variant is None:
        variant = infer_variant(load_state_dict(checkpoint))
        if variant is None:
            raise ValueError(
                f"--checkpoint {checkpoint}: its image encoder fits no known variant; pass --variant "
                f"({', '.join(sorted(VARIANTS))})"
            )
    return build_sam(variant, checkpoint=checkpoint).eval(), variant


def build_session(args: argparse.Namespace):
    """(engine, store, retrainer) for parsed arguments; errors name the bad file or option."""
    from samlight.inference.annotate.engine import AnnotationEngine
    from samlight.inference.annotate.images import ImageFolder
    from samlight.inference.annotate.retrain import Retrainer, RetrainSettings
    from samlight.inference.annotate.store import AnnotationStore

    if args.retrain_every is not None and args.retrain_every < 1:
        raise ValueError(f"--retrain-every must be >= 1, got {args.retrain_every}")
    if args.retrain_config is not None and not Path(args.retrain_config).is_file():
        raise ValueError(f"--retrain-config {args.retrain_config}: no such file")
    folder = ImageFolder(args.images)
    output = Path(args.output)
    store = AnnotationStore(folder, output, existing=args.existing)
    history_path = output / "retrain" / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    weights, model_round = args.checkpoint, 0
    if history:  # resume on the latest retrained weights, as the session resumes on its image
        weights, model_round = history[-1]["checkpoint"], int(history[-1]["round"])
        print(f"samlight annotate: serving the weights of retrain round {model_round} ({weights})")
    model, variant = _load_model(weights, args.variant)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = AnnotationEngine(model, folder, output / "embeddings", device=device, model_round=model_round)
    settings = RetrainSettings(
        every=args.retrain_every,
        config=None if args.retrain_config is None else Path(args.retrain_config).resolve(),
        steps=args.retrain_steps,
    )
    retrainer = Retrainer(engine, store, output, args.checkpoint, variant, settings)
    return engine, store, retrainer


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        engine, store, retrainer = build_session(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"samlight annotate: {e}", file=sys.stderr)
        return 2
    from werkzeug.serving import make_server

    from samlight.inference.annotate.server import create_app

    app = create_app(engine, store, retrainer)
    server = make_server(args.host, args.port, app, threaded=True)
    counts = store.counts()
    print(
        f"samlight annotate: {len(engine.folder)} images, {counts['human']} human + {counts['auto']} automatic "
        f"masks loaded; saving to {Path(args.output) / 'shards'}",
        flush=True,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"samlight annotate: listening on {args.host}: anyone who can reach it can annotate", flush=True
        )
    print(f"samlight annotate: open http://{args.host}:{server.server_port}/", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: end a running retrain round too
    try:
        engine.prefetch(store.current_image or engine.folder.entries[0].id)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        retrainer.stop()
        engine.close()
        server.server_close()
    return 0
