#!/usr/bin/env bash
# Full-size export + engine benchmark on one GPU (issue 7), as run on the lent H100:
#   write a random bf16 full checkpoint, llada-export it (AOTInductor, CUDA, K 16, keep 0.35,
#   1024x768 bucket, fused sampler, + unpruned baseline graph), then time the engines.
# Usage: tools/gpu_engines.sh OUT_DIR [WORK_DIR]
set -euo pipefail
out=${1:?usage: gpu_engines.sh OUT_DIR [WORK_DIR]}
work=${2:-/tmp/llada-gpu}
mkdir -p "$out" "$work"
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
stamp() { date +%s.%N; }
t0=$(stamp)
[ -f "$work/full/config.json" ] || python3 -m llada_export.cli.checkpoint --preset full -o "$work/full" --seed 0
t1=$(stamp)
python3 -m llada_export.cli.export --model "$work/full" \
  --prune-layer 16 --keep 0.35 --image-size 1024x768 --max-prompt-tokens 64 --gen-length 128 \
  --dtype bfloat16 --device cuda --backend aoti --fuse-sampler --baseline -o "$work/engines" --overwrite -q \
  2>&1 | tee "$out/export.log"
t2=$(stamp)
python3 tools/bench_gpu.py engines --engines "$work/engines" --images 1024x768 --presets mc,chartqa,demo \
  --repeat 2 --out "$out" 2>&1 | tee "$out/engines.log"
python3 - "$out" "$t0" "$t1" "$t2" <<'PY'
import json, sys
out, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
json.dump({"checkpoint_write_s": t1 - t0, "export_wall_s": t2 - t1}, open(f"{out}/walltimes.json", "w"))
PY
echo done > "$out/DONE"
