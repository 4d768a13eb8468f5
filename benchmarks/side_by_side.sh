#!/bin/bash
# Peer vs lenx, back to back, one process at a time: 3 train repeats at the peer's shape (A),
# the demo model at issue 14's batch (D: 32 x 128) and at the batch the demo's recipe trains
# with (R: 4 x 128, configs/sweep_demo.py) (peer, then lenx in each of $DTYPES, default
# "float32 bfloat16"), 2 eval-16k repeats, then
# (LONG=1) 64k bf16 and the memory sweep (1k..64k, f32). One JSON line per run, prefixed
# by its row name; the first line names the CPU and its speed flags. The peer runs in its
# own venv:   PEER_PY=/path/to/venv/bin/python bash benchmarks/side_by_side.sh > results.txt
# (venv: python3 -m venv V && V/bin/pip install torch==2.13.0 transformers)
cd "$(dirname "$0")/.." || exit 1
PEER_PY=${PEER_PY:-/tmp/hfvenv/bin/python}
PEER=${PEER:-../shared/bench/peer_torch_llama.py}
L=.venv/bin/python
A="--layers 4 --d-model 256 --heads 4 --ffn 688 --seq-len 256 --batch 16"
D="--layers 2 --d-model 128 --heads 4 --ffn 352 --seq-len 128 --batch 32 --steps 20"
R="--layers 2 --d-model 128 --heads 4 --ffn 352 --seq-len 128 --batch 4 --steps 100 --warmup-steps 10"
DTYPES=${DTYPES:-"float32 bfloat16"}
$L -c "import json; from models.layers import cpu_description, auto_dtype, cpu_dots; \
from models.cpu_attention import enabled, amx; from training.allocator import huge_pages_env; \
print('cpu', json.dumps({**cpu_description(), 'auto_dtype': auto_dtype(), 'cpu_dots': \
cpu_dots(), 'cpu_attention_kernel': enabled(), 'cpu_attention_amx': amx(), \
'malloc_huge_pages': huge_pages_env()[1]}))"
# lenx ROW ARGS...: one throughput.py run per dtype in $DTYPES; the first one of each call
# also measures this machine's matmul peaks (f32 and bf16: MFU), the others skip it
lenx() {
  local row=$1 peak=""
  shift
  for dt in $DTYPES; do
    $L benchmarks/throughput.py "$@" --dtype "$dt" $peak | sed "s/^/lenx_${row}_$dt /"
    peak="--peak-size 0"
  done
}
for r in 1 2 3; do
  for shape in A D R; do
    S=${!shape}
    echo "## train $shape repeat $r $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    $PEER_PY "$PEER" --mode train $S 2>/dev/null | tail -1 | sed "s/^/peer_train_$shape /"
    lenx "train_$shape" --mode train $S
  done
done
for r in 1 2; do
  echo "## eval repeat $r $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  $PEER_PY "$PEER" --mode eval --seq-len 16384 2>/dev/null | tail -1 | sed 's/^/peer_eval16k /'
  lenx eval16k --mode eval --seq-len 16384
done
if [ -n "$LONG" ]; then
  echo "## 64k $(date +%T)"
  $L benchmarks/throughput.py --mode eval --seq-len 65536 --dtype bfloat16 --steps 1 \
      --warmup-steps 0 --peak-size 0 | sed 's/^/lenx_eval64k_bf16 /'
  sh benchmarks/memory_sweep.sh 1024 4096 16384 65536 | sed 's/^/sweep /'
fi
echo "## done $(date +%T)"
