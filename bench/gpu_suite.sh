#!/usr/bin/env bash
# bash bench/gpu_suite.sh OUT_DIR            # the GPU machine: at most 9 min on one H200 (source .devcarry/activate.sh first)
# bash bench/gpu_suite.sh --smoke OUT_DIR    # any machine: tiny sizes, checks that every step runs (~5 min on 2 CPUs)
#
# The GPU presets of both benchmarks at sizes that fit one 10-minute call on one H200, every
# result in OUT_DIR: NAME.json (all numbers, the GPU's name, "ratio" / "ratio_steady" /
# "call_ratio"), NAME.log (the full output), and summary.txt (each step's last lines: the
# ratios). A step that fails or runs past its time limit is reported and the next one runs.
#
#   cuda-correctness     the actor's concurrent calls on the GPU write the same bytes as serial ones, and
#                        nvJPEG's pixels match a CPU decode of the same files (tests/teacher/
#                        test_pieces.py and test_image_decode.py, CUDA cases; needs pytest; limit 60 s)
#   teacher-w2v2         bench/teacher_throughput.py --preset wav2vec2-large  (~40 s of pipeline; limit 160 s)
#   teacher-vit          bench/teacher_throughput.py --preset vit-b16         (80k JPEGs, GPU decode; limit 130 s)
#   teacher-resnet50     bench/teacher_throughput.py --preset resnet50        (80k JPEGs, GPU decode; limit 110 s)
#   student-speech       bench/student_throughput.py --preset gpu-speech      (hard and soft, 4 shards; limit 120 s;
#                        only with SUITE_STUDENT=1, which takes the suite past 9 min: then drop a teacher step)
#   teacher-w2v2-compile the same teacher in process only, eager vs torch.compile (limit 80 s; last, as
#                        its compilation time is the least known)
#
# On the device machine (no Ray there; see ../shared/device/make-carry.sh):
#   source .devcarry/activate.sh && bash bench/gpu_suite.sh $OUT
set -uo pipefail
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out=${1:?usage: bash bench/gpu_suite.sh [--smoke] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
summary="$out/summary.txt"
: > "$summary"
{
  echo "kdpipe GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$py" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only', '| torch', torch.__version__)"
  echo "CPUs: $(nproc)"
} | tee -a "$summary"

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit} s): $*" | tee -a "$summary"
  timeout --signal=INT --kill-after=20 "$limit" "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1
  local rc=$?
  grep -E '^[a-z_]+=' "$out/$name.log" | tail -8 | sed 's/^/  /' | tee -a "$summary"
  echo "  rc=$rc, $((SECONDS - t0)) s" | tee -a "$summary"
}

if [ $smoke = 1 ]; then
  sizes_w2v=(--smoke)
  sizes_vit=(--smoke)
  sizes_rn=(--smoke --device cpu --image-decode gpu --skip-pipeline)
  sizes_student=(--smoke --only hard soft)
  sizes_compile=(--smoke)
else
  # 28,000 ten-second clips: ~41 s of pure forward at the 682 clips/s measured on an H200.
  sizes_w2v=(--shards 56 --forward-seconds 5)
  # 80,000 JPEGs: 9 s of pure forward; ~40 s at the ~2,000 img/s a CPU-decoded pipeline reached.
  sizes_vit=(--shards 80 --forward-seconds 5)
  # 80,000 JPEGs: ~7 s of pure forward at 12,744 img/s; decoded on the GPU, the pipeline's aim.
  sizes_rn=(--shards 80 --forward-seconds 5)
  sizes_student=(--shards 4 --only hard soft --step-seconds 5)
  sizes_compile=(--shards 2 --forward-seconds 4 --warmup 2)
fi
if "$py" -c "import pytest" 2>/dev/null; then
  t0=$SECONDS
  echo "== cuda-correctness (limit 60 s)" | tee -a "$summary"
  timeout --kill-after=10 60 "$py" -m pytest -q -p no:cacheprovider tests/teacher/test_pieces.py tests/teacher/test_image_decode.py -k cuda \
    -rs > "$out/cuda-correctness.log" 2>&1
  echo "  rc=$?, $(tail -1 "$out/cuda-correctness.log"), $((SECONDS - t0)) s" | tee -a "$summary"
else
  echo "== cuda-correctness: skipped (no pytest here; EXTRA_PKGS=pytest for make-carry.sh)" | tee -a "$summary"
fi
step teacher-w2v2 160 "$py" bench/teacher_throughput.py --preset wav2vec2-large "${sizes_w2v[@]}"
step teacher-vit 130 "$py" bench/teacher_throughput.py --preset vit-b16 "${sizes_vit[@]}"
step teacher-resnet50 110 "$py" bench/teacher_throughput.py --preset resnet50 "${sizes_rn[@]}"
if [ "${SUITE_STUDENT:-0}" = 1 ] || [ $smoke = 1 ]; then
  step student-speech 120 "$py" bench/student_throughput.py --preset gpu-speech "${sizes_student[@]}"
fi
step teacher-w2v2-compile 80 "$py" bench/teacher_throughput.py --preset wav2vec2-large --skip-pipeline --compile \
  "${sizes_compile[@]}"
echo "results in $out" | tee -a "$summary"
