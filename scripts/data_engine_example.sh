#!/usr/bin/env bash
# The data engine at tiny scale on a CPU (docs/data-engine.md, section 4): train on 16 labelled demo images,
# annotate 48 more automatically, measure the automatic masks, train again on all 64, compare on the held-out set.
#   bash scripts/data_engine_example.sh [WORKDIR]        (default ./engine; STEPS=80 by default)
set -euo pipefail
W=${1:-engine}
STEPS=${STEPS:-80}
mkdir -p "$W"
D=$(python -c "from samlight.datamodules.demo import make_demo_shards as m; print(m()[0][0].rsplit('/', 2)[0])")
FIT=(--config configs/quickstart.yaml --data.init_args.num_workers=1 --data.init_args.batch_size=2
     --data.init_args.max_masks=8 --trainer.max_steps="$STEPS" --trainer.val_check_interval="$STEPS"
     --trainer.limit_val_batches=2 --trainer.enable_progress_bar=false)

# Round 1: the labelled images only (demo shard 0, 16 images).
samlight fit "${FIT[@]}" --data.init_args.train_urls="$D/train/demo-train-000000.tar" \
    --trainer.default_root_dir="$W/round1" 2>&1 | grep "samlight: " | tee "$W/round1.txt"
CKPT=$(ls "$W"/round1/quickstart/version_0/checkpoints/*.ckpt | tail -1)

# Automatic stage: annotate shards 1-3 (48 images); their masks are ignored (no --keep-existing).
samlight data annotate --checkpoint "$CKPT" --images "$D/train/demo-train-{000001..000003}.tar" \
    --output "$W/auto" --points-per-side 12 --pred-iou-thresh 0.3 --stability-score-thresh 0.5 \
    --devices 1 --accelerator cpu --workers 1 --no-progress | tee "$W/annotate.txt"

# How good are the automatic masks against the masks the demo set really has?
samlight data evaluate --pred "$W/auto" --gt "$D/train/demo-train-{000001..000003}.tar" | tee "$W/evaluate.txt"

# Round 2: the same steps from scratch on the union (16 labelled + 48 automatically annotated).
samlight fit "${FIT[@]}" \
    --data.init_args.train_urls="$D/train/demo-train-000000.tar::$W/auto/demo-train-{000001..000003}.tar" \
    --trainer.default_root_dir="$W/round2" 2>&1 | grep "samlight: " | tee "$W/round2.txt"
