#!/usr/bin/env bash
# Multi-node launch with torchrun: run this same line on every node, changing only NODE_RANK.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 scripts/torchrun.sh --config configs/YOUR_RUN.yaml
# Adds the FSDP2 add-on and resumes from checkpoints/last.ckpt when one exists (see docs/scaling.md).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
here="$(cd "$(dirname "$0")/.." && pwd)"
exec torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" --node-rank="$NODE_RANK" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m samlight.cli.main fit \
  "$@" --config "$here/configs/fsdp.yaml" \
  --trainer.devices="$GPUS_PER_NODE" --trainer.num_nodes="$NNODES" --ckpt_path=last
