#!/bin/sh
# Eval time and peak RSS vs length (batch 1, default 4x256 model, blockwise beyond 2 blocks).
# Usage: sh benchmarks/memory_sweep.sh [lengths...]   -> one JSON line per length
cd "$(dirname "$0")/.." || exit 1
for L in ${@:-1024 4096 16384 65536}; do
  .venv/bin/python benchmarks/throughput.py --mode eval --seq-len "$L" --steps 1 \
      --warmup-steps 0 --peak-size 0 --dtype float32
done
