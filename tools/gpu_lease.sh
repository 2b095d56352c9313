#!/usr/bin/env bash
# The GPU measurements issues 22 and 23 still lack, in priority order, run in the background on a lent
# GPU machine so that they outlast one device call (10 minutes at most a call; the machine stays held
# while calls follow each other). Each step writes under /tmp/res/<step>/; a step that fails or is cut
# leaves what it saved (bench_gpu saves after each group / batch size) and the next step runs.
#
# On the device machine, from the repository root (the device tool's working directory):
#   bash tools/gpu_lease.sh start [STEP,...]   # starts the steps in a new process session, returns at once
#   bash tools/gpu_lease.sh poll SECONDS       # waits (or until all steps are done), packs /tmp/res into
#                                              # $OUT/res.tgz and $OUT/log.txt, prints the progress
#   bash tools/gpu_lease.sh ray                # unpacks .raybundle/ray_serve_cp312.tar.xz for the loadtest step
# Steps (the default runs those of STEPS_ALL below, in its order; name others to run them):
#   official   the official code, chartqa + demo, vanilla + its Fast-dLLM hook, once each or OFFICIAL_REPEAT times (tools/official_gpu.py;
#              needs .official = your checkout holding train/llava, and .whl = the wheels of transformers
#              4.39.1, tokenizers 0.15.2 and huggingface_hub 0.36.2 for CPython 3.12, both ignored by git and
#              named in the device tool's carry: see tools/official_gpu.py's docstring)
#   batch      bench_gpu batch: B = 1 and a lone request on a --batch-sizes 1,2,4,8 directory (--multi)
#   kvcap      tools/kv_capacity.py --measure at B = 1, 8, 16 (and the predicted largest batch)
#   unpruned   bench_gpu engines unpruned/native (bf16 unpruned + cache; pruned + cache at B = 1 is the batch step's)
#   loadtest   llada-serve on Ray Serve, demo model, engines of batch sizes 1,2,4,8 on the GPU, streaming,
#              closed-loop clients and open-loop rates (tools/load_test.py; waits up to 5 minutes for `ray`)
#   load       tools/bench_load.py export + measure (precompiled kernels, weights read from disk; ran 2026-12-07:
#              40.3 s warm, benchmarks/bench_load.md, before the weights' hash ran beside the load; at 09:39 with
#              LOAD_ARGS="--readers auto safetensors fastsafetensors-buffered --profile": 22.6-32.2 s warm,
#              benchmarks/bench_load_readers.md; 10 minutes; at 12:30 with LOAD_ARGS="--readers auto safetensors":
#              cold and warm loads of both readers, 14.6 / 16.9 s warm, benchmarks/bench_load_light.md, 6 minutes)
#   loaddet    the load step on engines exported with TORCHINDUCTOR_FORCE_FILTER_REDUCTION_CONFIGS=1 (Inductor's filter
#              of each reduction kernel's configurations down to one, baked into the saved kernels): does a load
#              still tune kernels by timing (benchmarks/bench_load_light.md: 19 a load), do the loads answer the same
#              ids, and at what cost (compare the graphs' times with the load step's). About 7 minutes; ran 2026-12-07
#              23:21 (benchmarks/bench_load_det.md): still 18 kernels tuned a load, loads 1 of 16 tokens apart
#   loadquick  bench_load export, then one fresh-process load per reader (auto, safetensors) on the export's warm
#              Inductor caches: the warm load's stages in about 5 minutes (no cold load, no profile; ran 2026-12-07
#              10:15: 20.5 s fastsafetensors first, 18.2 s load_file second, benchmarks/bench_load_quick.md)
#   engines    bench_gpu engines pruned/native (bf16 pruned + cache, chartqa and demo)
#   enginesmasked  the engines step with --cached-attention masked (the kernel before 2026-12-07 15:53), to run
#              beside `engines` in one lease for a same-machine before / after (about 4 minutes)
#   enginesall bench_gpu engines, several groups in one process and one report: bf16 pruned + cache, FP8 with
#              per-tensor activation scales pruned + cache, bf16 unpruned + cache (ENGINES_GROUPS, ENGINES_WEIGHTS
#              replace them); chartqa and demo; about 14 minutes
#   fp8probe   tools/fp8_gemm_probe.py: the FP8 GEMMs of one decoder layer at the cached step's rows, every kernel
#              form against bf16 and the weight-read floor; about 2 minutes
#   prep       tools/preprocess_probe.py on the GPU: an image's preprocessing with the normalisation on the CPU (before)
#              and on the GPU (now), 1024x768, 384x384, 1920x1080; under a minute. Not yet run
#   step       bench_gpu step: the cached step piece by piece at B = 1, its attention kernels (the engines' flash
#              attention over zeroed padding among them, with its error against fp32), about 2 minutes
#   stepb8     the same at B = 8, where cuDNN's unmasked kernel was the fastest (0.084 against flash's 0.144 ms a layer,
#              benchmarks/bench_gpu_step_b8_1207.md): times cuDNN over the zeroed padding + rescale and its error.
#              Ran 2026-12-07 23:21 (benchmarks/bench_gpu_step_b8_1207_late.md): 0.1363 against flash's 0.1404 ms
#   batchmore  bench_gpu batch: pruned + cache at B = 1, 2, 4, 8, 16 (each size's engines, back to back)
#   batchunpruned  bench_gpu batch: unpruned + cache at B = 1, 8
#   scaleall   issue 23 item 5 in one lease: pruned + cache at B = 1, 2, 4, 8, 16 and unpruned + cache at 1, 2, 4, 8
#              (16 and pruned 24 on a card of > 100 GB), exports side by side, then timed back to back
#              (scale_all below); under scaleall/pruned and scaleall/unpruned. Ran twice on 2026-12-07 (the
#              second with SCALE_QUEUE="8 unpruned+cache,8 pruned+cache,1 unpruned+cache,1 pruned+cache": 17
#              minutes, benchmarks/bench_gpu_batch_scale8_paths.md); what the scale still lacks is unpruned 16 and
#              pruned 24, on a card of more than 100 GB: SCALE_QUEUE="16 unpruned+cache,16 pruned+cache,24
#              pruned+cache,1 unpruned+cache,1 pruned+cache" (nvidia-h200). On an 80 GB H100 at 09:50 the unpruned
#              B = 16 export ran out of memory 36 s into its build, twice: its cached step's two programs each held
#              an example KV cache (30 GiB). They share one since d341742: with SCALE_QUEUE="16 unpruned+cache,1
#              unpruned+cache" it exported there at 12:36 (170 s; the step then stopped on a bug of a one-path queue,
#              fixed since; timed by hand: benchmarks/bench_gpu_batch_1207_unpruned16.md)
#   scale1/2/3 the batch scale: pruned + cache at B = 1, 8, 16; unpruned + cache at 1, 8, 16; pruned at 2, 4 and
#              24 (added to scale1's report in the same lease, else beside a fresh 1); under scale/pruned, scale/unpruned.
#              (scale1 ran on 2026-12-06 at 23:18; scaleall replaces the three: one size per lease is too slow)
#   fp8        bench_gpu engines pruned/fp8 (measured on 2026-12-06: benchmarks/bench_gpu_engines_fp8.md)
# Device time: official 1 min, batch 9, kvcap 2, unpruned 4, loadtest 5, load 5, engines 4, batchmore 4 per size
# (about 18), batchunpruned 8, fp8 6, scale1 15 (5 per size, B = 16 included), scale2 15, scale3 15.
# scale1 and scale2's B = 1 ran on 2026-12-06 at 23:18 (benchmarks/bench_gpu_batch_scale*.md). Measured on 2026-12-06 (benchmarks/bench_gpu_batch_multi.md,
# kv_capacity_h100.md, load_test_gpu_stream.md): batch, kvcap, loadtest; the default runs the rest, the load first.
# scaleall 21 on an H100 (its exports stop starting after 9 minutes; 2026-12-07: benchmarks/bench_gpu_batch_scale_paths.md).
set -u
RES=/tmp/res
STEPS_ALL="load,official,engines,scaleall"

run_steps() {
  export PYTHONUNBUFFERED=1
  mkdir -p $RES
  rm -rf /tmp/lease && mkdir -p /tmp/lease && cp -r llada_export tools /tmp/lease/
  [ -d .official ] && rm -rf /tmp/official && cp -r .official /tmp/official
  ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl
  # our own dependencies the GPU machine lacks (fastsafetensors: the weights file read by threads), for CPython 3.12:
  # pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 -d .whl/ours fastsafetensors
  ls .whl/ours/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/oursite .whl/ours/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  cd /tmp/lease
  export PYTHONPATH=/tmp/lease:/tmp/oursite
  # fastsafetensors dlopens "libcudart.so"; torch's wheels ship only the versioned libcudart.so.N: link it
  if ! ldconfig -p 2>/dev/null | grep -q 'libcudart.so '; then
    local rt; rt=$(python3 -c "import glob, os, torch; d = os.path.dirname(os.path.dirname(torch.__file__)); \
print((sorted(glob.glob(d + '/nvidia/*/lib/libcudart.so.*')) + sorted(glob.glob(d + '/nvidia/cuda_runtime/lib/libcudart.so.*')) + [''])[0])")
    [ -n "$rt" ] && mkdir -p /tmp/oursite/lib && ln -sf "$rt" /tmp/oursite/lib/libcudart.so \
      && export LD_LIBRARY_PATH=/tmp/oursite/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} && echo "libcudart.so -> $rt"
  fi
  local eng="tools/bench_gpu.py engines --weights native,fp8 --paths pruned+cache,unpruned+cache --presets chartqa,demo
             --no-step-profile --no-warm-load"
  local batch="tools/bench_gpu.py batch --paths pruned+cache --presets demo --images 1024x768 --layers 16 --keeps 0.35"
  for s in ${1//,/ }; do
    echo "=== $(date +%T) $s"; echo "$s" > $RES/STEP; mkdir -p $RES/$s
    case $s in
      official)  # OFFICIAL_REPEAT=3: the median of three runs of each (a single run moved the x-hook ratio 20% across hosts)
        (cd /tmp && PYTHONPATH=/tmp/site timeout $((200 + 100 * ${OFFICIAL_REPEAT:-1})) python3 /tmp/lease/tools/official_gpu.py \
            --official /tmp/official --presets chartqa,demo --repeat ${OFFICIAL_REPEAT:-1} --out $RES/official/official_gpu.json) ;;
      step) timeout 600 python3 tools/bench_gpu.py step --out $RES/step ;;  # the cached step piece by piece
      stepb8)  # the same at B = 8 (1024 rows): cuDNN over the zeroed padding + rescale, the candidate for large batches
        timeout 600 python3 tools/bench_gpu.py step --step-rows 8 --out $RES/stepb8 ;;
      enginesmasked)  # the engines step with the masked cached attention: before / after on one machine
        local offm=""; [ -f $RES/official/official_gpu.json ] && offm="--official $RES/official/official_gpu.json"
        timeout 1200 python3 $eng $offm --groups pruned/native --cached-attention masked --out $RES/$s ;;
      enginesall)  # several groups in one process and one report (default: bf16 pruned and unpruned + cache and
        # FP8 per-tensor pruned + cache; ENGINES_GROUPS / ENGINES_WEIGHTS replace them), about 14 minutes
        local offa=""; [ -f $RES/official/official_gpu.json ] && offa="--official $RES/official/official_gpu.json"
        timeout 1500 python3 ${eng/native,fp8/${ENGINES_WEIGHTS:-native,fp8-tensor}} $offa \
            --groups ${ENGINES_GROUPS:-pruned/native,pruned/fp8-tensor,unpruned/native} --out $RES/$s ;;
      fp8probe)  # the FP8 GEMMs at the cached step's rows (tools/fp8_gemm_probe.py; a poll may copy a newer one in)
        timeout 400 python3 tools/fp8_gemm_probe.py --out $RES/fp8probe/fp8_gemm_probe ;;
      prep) timeout 300 python3 tools/preprocess_probe.py --device cuda --out $RES/prep/preprocess_probe_gpu ;;
      engines|unpruned|fp8)
        local off=""; [ -f $RES/official/official_gpu.json ] && off="--official $RES/official/official_gpu.json"
        local groups=pruned/native; [ $s = fp8 ] && groups=pruned/fp8; [ $s = unpruned ] && groups=unpruned/native
        timeout 1200 python3 $eng $off --groups $groups --out $RES/$s ;;
      batch) timeout 900 python3 $batch --batch-sizes 1 --multi 1,2,4,8 --out $RES/batch ;;
      batchmore)  # a run cut by the lease: --resume OUT/bench_gpu_batch.json in the next lease measures the rest
        timeout 1500 python3 $batch --batch-sizes 1,2,4,8,16 --out $RES/batchmore ;;
      batchunpruned)
        timeout 900 python3 ${batch/pruned+cache/unpruned+cache} --batch-sizes 1,8 --out $RES/batchunpruned ;;
      scale1)  # the ends of the scale first: pruned + cache at B = 1, 8, 16
        timeout 1200 python3 $batch --batch-sizes 1,8,16 --out $RES/scale/pruned ;;
      scale2)  # unpruned + cache at B = 1, 8, 16 (16 is above an 80 GB card by tools/kv_capacity.py)
        timeout 1200 python3 ${batch/pruned+cache/unpruned+cache} --batch-sizes 1,8,16 --out $RES/scale/unpruned ;;
      scale3)  # the sizes between and the largest pruned batch by the capacity model: added to scale1's report
        # in the same lease, else beside a fresh B = 1 (1, 8, 16 ran on 2026-12-06: bench_gpu_batch_scale.md)
        if [ -f $RES/scale/pruned/bench_gpu_batch.json ]; then
          timeout 1500 python3 $batch --batch-sizes 1,2,4,8,16,24 --resume $RES/scale/pruned/bench_gpu_batch.json \
              --out $RES/scale/pruned
        else timeout 1500 python3 $batch --batch-sizes 1,2,4,24 --out $RES/scale/pruned; fi ;;
      scaleall)  # every batch size of both paths in one lease: exports side by side, then timed one at a time
        scale_all ;;
      loadtest)
        for _ in $(seq 60); do [ -f /tmp/raysite.ready ] && break; sleep 5; done
        [ -f /tmp/raysite.ready ] || { echo "no ray: run 'bash tools/gpu_lease.sh ray' with .raybundle carried"; continue; }
        timeout 600 python3 -m llada_export.cli.export --model llada_export/assets/demo-model --prune-layer 3 \
            --keep 0.5 --cache --image-size 384x288 --gen-length 32 --block-length 8 --max-prompt-tokens 72 \
            --batch-sizes 1,2,4,8 --backend inductor --device cuda --dtype bfloat16 -q -o /tmp/serve-engines &&
        PYTHONPATH=/tmp/raysite:/tmp/lease timeout 900 python3 tools/load_test.py --engines /tmp/serve-engines \
            --replicas 1 --max-batch 8 --batch-wait-ms 20 --concurrency 1 4 8 16 --rate 5 10 20 40 --requests 16 \
            --stream --out $RES/loadtest/load_test_gpu_stream ;;
      kvcap) timeout 600 python3 tools/kv_capacity.py --measure --batches 1,8,16 --out $RES/kvcap/kv_capacity_h100 ;;
      load) timeout 600 python3 tools/bench_load.py export --engines /tmp/bench_load_engines --no-compile-cache &&
            timeout 900 python3 tools/bench_load.py measure --engines /tmp/bench_load_engines --modes precompiled \
                ${LOAD_ARGS:---readers auto --profile} --out $RES/load ;;  # 2026-12-07 10:00: LOAD_ARGS="--readers
                # auto safetensors fastsafetensors-buffered --profile"; 10:45: LOAD_ARGS="--compile-threads default 1"
      loaddet)
        TORCHINDUCTOR_FORCE_FILTER_REDUCTION_CONFIGS=1 timeout 600 python3 tools/bench_load.py export \
            --engines /tmp/bench_load_det --no-compile-cache &&
        timeout 900 python3 tools/bench_load.py measure --engines /tmp/bench_load_det --modes precompiled \
            --readers auto safetensors --out $RES/loaddet --name bench_load_det ;;
      loadquick)  # the load in one fresh process per reader, on the caches the export filled (about 5 minutes)
        timeout 400 python3 tools/bench_load.py export --engines /tmp/bench_load_engines --no-compile-cache &&
        for r in auto safetensors; do
          LLADA_WEIGHTS_READER=$r timeout 120 python3 tools/bench_load.py load --engines /tmp/bench_load_engines \
              --mode precompiled | tail -1 > $RES/loadquick/load_$r.json
          cat $RES/loadquick/load_$r.json | cut -c1-900
        done
        python3 tools/bench_load.py collect --engines /tmp/bench_load_engines --out $RES/loadquick --name bench_load_quick \
            --loads "precompiled, reader auto (1st process)=$RES/loadquick/load_auto.json" \
            "precompiled, reader safetensors (2nd process)=$RES/loadquick/load_safetensors.json" ;;
      *) echo "unknown step $s" ;;
    esac
  done
  echo done > $RES/STEP
}

# scaleall: pruned + cache at B = 1, 2, 4, 8, 16 and unpruned + cache at 1, 2, 4, 8 (and on a card of more than
# 100 GB unpruned 16 and pruned 24), demo preset, queued in order of need (B = 8 and 1 of both paths first). The exports (2-6 minutes each,
# mostly the compiler on the CPU) run side by side, at most SCALE_JOBS at once (default 3): the first queued one
# whose GPU memory fits beside the running ones' in the card's less 4 GiB (each: 32 GiB of weights and fused
# copies + B x 2.5 GiB pruned, B x 4.5 unpruned, for the example cache and autotuning); none starts after
# SCALE_DEADLINE seconds (default 540) or a `touch /tmp/res/scale_stop`. An export that failed beside others runs
# once more alone. Then one process per path times its sets back to back (bench_gpu.py batch --prebuilt): no
# timing overlaps an export. Ran on an H100 on 2026-12-07 (21 minutes with the first memory guess; pruned 16
# ran out of memory and unpruned 8 was cut by the deadline): on an 80 GB card the exports mostly run one or
# two at once, so the whole queue takes more than one lease there; SCALE_QUEUE="B path,..." replaces the queue
# (what is missing, with B = 1 of each path for the same-lease ratios).
scale_all() {
  local W=/tmp/scale-work start=$(date +%s) total P U b i
  local -a q pids needs
  total=$(( $(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1) / 1024 - 4 ))
  P="1,2,4,8,16"; U="1,2,4,8"
  # in order of need: the B = 8 / B = 1 ratio and pruned against unpruned first, then the rest of the scale
  q=("8 pruned+cache" "8 unpruned+cache" "1 pruned+cache" "1 unpruned+cache" "16 pruned+cache" "4 pruned+cache"
     "2 pruned+cache" "4 unpruned+cache" "2 unpruned+cache")
  if [ $total -gt 100 ]; then P="$P,24"; U="$U,16"; q+=("16 unpruned+cache" "24 pruned+cache"); fi
  if [ -n "${SCALE_QUEUE:-}" ]; then  # e.g. SCALE_QUEUE="8 unpruned+cache,8 pruned+cache" for a short lease
    IFS=, read -ra q <<< "$SCALE_QUEUE"
    P=$(printf '%s\n' "${q[@]}" | awk '$2 == "pruned+cache" {print $1}' | sort -n | paste -sd,)
    U=$(printf '%s\n' "${q[@]}" | awk '$2 == "unpruned+cache" {print $1}' | sort -n | paste -sd,)
  fi
  # GiB an export process takes at its peak (the precompile's autotuning included), from the H100 lease of
  # 2026-12-07: pruned B = 8 held 49.7 GiB, unpruned B = 4 needed more than 48.6; the first guess (30 GiB +
  # the example KV cache) let three exports run out of memory in their autotuning (compiled at load instead)
  need() { [ $2 = pruned+cache ] && echo $(( 32 + ($1 * 5 + 1) / 2 )) || echo $(( 32 + ($1 * 9 + 1) / 2 )); }
  export_one() {  # size path -> the exit status of its export (its log under $RES/scaleall/)
    timeout 900 python3 $batch --paths $2 --batch-sizes $1 --export-only --workdir $W \
      > $RES/scaleall/export_${2/+/_}_b$1.log 2>&1
  }
  late() { [ $(( $(date +%s) - start )) -gt ${SCALE_DEADLINE:-540} ] || [ -f $RES/scale_stop ]; }
  while [ ${#q[@]} -gt 0 ] && ! late; do  # start the first queued export that fits beside the running ones
    local running=0 used=0 pick=-1
    for i in "${!pids[@]}"; do kill -0 ${pids[$i]} 2>/dev/null && { running=$((running + 1)); used=$((used + needs[$i])); }; done
    if [ $running -lt ${SCALE_JOBS:-3} ]; then
      for i in "${!q[@]}"; do
        set -- ${q[$i]}
        if [ $running -eq 0 ] || [ $(( used + $(need $1 $2) )) -le $total ]; then pick=$i; break; fi
      done
    fi
    if [ $pick -lt 0 ]; then sleep 5; continue; fi
    set -- ${q[$pick]}
    echo "$(date +%T) export $2 B=$1 ($(need $1 $2) GiB beside $used of $total; $running running)"
    export_one $1 $2 & pids+=($!); needs+=($(need $1 $2))
    unset "q[$pick]"; q=("${q[@]}")
    sleep 1
  done
  [ ${#q[@]} -gt 0 ] && echo "$(date +%T) not exported (deadline): ${q[*]}"
  wait
  local item items=()  # (a queue of one path leaves the other's list empty: no item for it)
  [ -n "$P" ] && items+=($(printf '%s\n' ${P//,/ } | sed 's/$/:pruned+cache/'))
  [ -n "$U" ] && items+=($(printf '%s\n' ${U//,/ } | sed 's/$/:unpruned+cache/'))
  for item in "${items[@]}"; do
    set -- ${item%%:*} ${item#*:}  # an export that was started and failed beside others: once more, alone
    [ -f $W/engines_${2/+/_}_b$1/bench_export.json ] || [ ! -f $RES/scaleall/export_${2/+/_}_b$1.log ] \
      || late || { echo "$(date +%T) export $2 B=$1 again, alone"; export_one $1 $2; }
  done
  echo "$(date +%T) exports done: $(ls $W | tr '\n' ' ')"
  [ -n "$P" ] && timeout 900 python3 $batch --batch-sizes $P --prebuilt --workdir $W --out $RES/scaleall/pruned
  [ -n "$U" ] && timeout 900 python3 ${batch/pruned+cache/unpruned+cache} --batch-sizes $U --prebuilt --workdir $W \
    --out $RES/scaleall/unpruned
}

case ${1:-} in
  start) mkdir -p $RES && setsid nohup bash "$0" run "${2:-$STEPS_ALL}" > $RES/log 2>&1 < /dev/null & ;;
  run) run_steps "$2" ;;
  ray) mkdir -p /tmp/raysite && tar -xJf .raybundle/ray_serve_cp312.tar.xz -C /tmp/raysite && touch /tmp/raysite.ready ;;
  poll)
    end=$(( $(date +%s) + ${2:?seconds} ))
    while [ "$(date +%s)" -lt $end ] && ! grep -qx done $RES/STEP 2>/dev/null; do sleep 5; done
    (cd $RES && tar czf "$OUT/res.tgz" --exclude='*.partial*' .) && cp $RES/log "$OUT/log.txt"
    echo "STEP: $(cat $RES/STEP)"; grep -E '^===|Error|Traceback|^multi|"batch_size"|^(un)?pruned\/|"preset"' $RES/log | cut -c1-300 | tail -30 ;;
  *) sed -n 2,25p "$0"; exit 2 ;;
esac
