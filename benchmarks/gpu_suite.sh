#!/usr/bin/env bash
# Every GPU measurement of the README in one run of at most 8 minutes, each step under its own timeout, each step's
# JSON line appended to one results file (a step that fails or times out gets a line saying so).
#
#   benchmarks/gpu_suite.sh [--out DIR]        # on the GPU machine, from the repository root
#   benchmarks/gpu_suite.sh --tiny [--out DIR] # the same steps on tiny networks: a CPU check of the script
#   benchmarks/gpu_suite.sh --fetch-wheels     # where PyPI is reachable: the wheels the GPU machine lacks, in .whl/
#
# Steps (seconds allowed; they add up to 470):
#   imports      15  every module the suite runs imports (jax, jaxlib, flax, optax, orbax versions; devices)
#   attention    45  benchmarks/attention_speed.py: joint attention, XLA against cuDNN, forward and backward
#   sr_speed    150  benchmarks/sr_speed.py --cases b1,b16,tiled --torch: one-step SR 128->512 at batch 1 and 16 and
#                    512->2048 tiled, against the same network in torch (eager and torch.compile) in the same run
#   train_isc    90  benchmarks/train_speed.py --stage student_isc --batches 8,16: MFU, compiled memory
#   train_gan   100  benchmarks/train_speed.py --stage student_gan --batches 4,8
#   train_fm     70  benchmarks/train_speed.py --stage teacher_fm --batches 16
# Compiled memory of the default steps comes with the train_speed lines (`peak_gib`, XLA's memory analysis of the GPU
# executable, at the default per-device batches ISC 16, GAN 8, teacher 16); stage 3's step is left out for time
# (benchmarks/memory_sd35m.py --stage student_reward compiles it alone).
# Results: DIR/results.jsonl (default benchmarks/results/<date>), each step's whole output in DIR/<step>.log.
#
# The GPU machine this is made for (a lent H100 or H200; nothing can be downloaded there): Python 3.12 with jax and
# jaxlib 0.11 and the CUDA 13 plugin, flax, optax, orbax-checkpoint, tensorstore, etils, transformers, safetensors,
# tokenizers, torch 2.11, numpy, scipy, scikit-image, opencv, pillow. It lacks grain, array_record, portpicker,
# ml_collections and diffusers (and importlib_metadata, which diffusers needs); tensorflow, tensorflow-datasets and
# clu are not needed by these steps. Bring them as Python 3.12 wheels: run `--fetch-wheels` here (the versions of
# requirements*.txt), carry .whl/ along, and the suite installs them into /tmp/site before the first step.
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
OUT=""
FETCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --out) OUT="$2"; shift ;;
    --fetch-wheels) FETCH=1 ;;
    *) echo "usage: $0 [--tiny] [--out DIR] [--fetch-wheels]" >&2; exit 2 ;;
  esac
  shift
done

# The project's .venv where there is one (make install), else the machine's python3; PYTHON=... chooses.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

pinned() {  # NAME -> NAME==VERSION as requirements*.txt pin it
  grep -hiE "^$1==" requirements.txt requirements-dev.txt | head -1
}

if [ "$FETCH" = 1 ]; then
  mkdir -p .whl
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "$(pinned grain)" "$(pinned array_record)" "$(pinned ml_collections)" "$(pinned diffusers)" \
    portpicker==1.6.0 importlib_metadata==10.2.0
  exit $?
fi

if ! "$PYTHON" -c "import grain, array_record, ml_collections, diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

OUT="${OUT:-benchmarks/results/$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

# run STEP SECONDS COMMAND...: the command's last JSON line goes to results.jsonl, or a line naming the failure.
run() {
  local step="$1" seconds=$(($2 * SCALE))
  shift 2
  local start=$SECONDS
  echo "== $step (at most ${seconds} s): $*"
  timeout --kill-after=10 "$seconds" "$@" > "$OUT/$step.log" 2>&1
  local rc=$?
  "$PYTHON" - "$step" "$rc" "$((SECONDS - start))" "$OUT/$step.log" >> "$RESULTS" <<'EOF'
import json, sys
step, rc, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = open(log, errors="replace").read().splitlines()
found = [line for line in lines if line.startswith('{"name"')]
if rc == 0 and found:
    print(json.dumps({**json.loads(found[-1]), "suite_step": step, "suite_seconds": seconds}))
else:
    status = "timeout" if rc in (124, 137) else "error"
    print(json.dumps({"name": step, "suite_step": step, "status": status, "rc": rc, "suite_seconds": seconds,
                      "tail": lines[-5:]}))
EOF
  tail -n 1 "$RESULTS" | cut -c1-300
}

if [ "$TINY" = 1 ]; then
  SCALE=4  # tiny networks on a CPU compile slower than they run: the same steps, more time each
  SIZE=(--tiny)
  TRAIN=(--tiny --steps 2 --warmup 1)
  SR=(--tiny --torch --torch_compile none --repeats 2)
  ISC_BATCHES=() GAN_BATCHES=() FM_BATCHES=()
else
  SCALE=1
  SIZE=()
  TRAIN=()
  SR=(--cases b1,b16,tiled --torch)
  ISC_BATCHES=(--batches 8,16) GAN_BATCHES=(--batches 4,8) FM_BATCHES=(--batches 16)
fi

run imports 15 "$PYTHON" -c '
import json, flax, jax, jaxlib, optax, orbax.checkpoint
from benchmarks import attention_speed, sr_speed, train_speed
print(json.dumps({"name": "imports", "value": len(jax.devices()), "unit": "devices", "jax": jax.__version__,
                  "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
                  "device": jax.devices()[0].device_kind, "backend": jax.default_backend()}))'
run attention 45 "$PYTHON" benchmarks/attention_speed.py "${SIZE[@]}"
run sr_speed 150 "$PYTHON" benchmarks/sr_speed.py "${SR[@]}"
run train_isc 90 "$PYTHON" benchmarks/train_speed.py --stage student_isc "${TRAIN[@]}" "${ISC_BATCHES[@]}"
run train_gan 100 "$PYTHON" benchmarks/train_speed.py --stage student_gan "${TRAIN[@]}" "${GAN_BATCHES[@]}"
run train_fm 70 "$PYTHON" benchmarks/train_speed.py --stage teacher_fm "${TRAIN[@]}" "${FM_BATCHES[@]}"

echo "results: $RESULTS"
