#!/usr/bin/env bash
# The GPU check, in one script: every GPU figure the project reports comes from one run of this.
#
#   bench/gpu_check.sh --prepare            here (with package registries): put what the GPU machine lacks into .gpu/
#                                           (ComfyUI's code, and wheels of the few pure-Python packages it imports)
#   bench/gpu_check.sh [--out DIR]          on the GPU machine (bare, no network), from the repository root
#   bench/gpu_check.sh --tiny [--out DIR]   the same steps on the CPU at tiny sizes: check the script end to end
#                                           before spending GPU minutes on it
#
# Steps, each writing under DIR (default ./gpu-check): env.txt (device, torch, triton, ComfyUI), kernels.xml/.log
# (tests/unit/test_triton_kernels.py: compiled kernels vs torch references in bf16 and fp32, head dim 128, long
# sequences, >2^31-element offsets where memory allows), perf-512/perf-1024 (loom bench perf at Flux-dev size:
# 1/4/16 adapters x 1/4 regions; base, merged, regional with and without base blending, gates, hooks, composite,
# dense per-head; step time, ratio to merged, FLOP limit, peak memory per method; perf-512 also the merged patch
# step, Loom vs core, 1 and 4 rank-32 LoRAs), and dynamic/ (the merged-mode
# step under ComfyUI 0.33's dynamic VRAM, when .gpu/comfyui-0.33 or $LOOM_GPU_COMFYUI_DYNAMIC holds that ComfyUI).
# A step that fails is logged in summary.txt and the next step still runs; the exit status is non-zero if any failed.
# Budget on an H200: under 8 minutes in all (model build ~1 min, kernels ~1 min, perf ~5 min).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="gpu-check"
tiny=0
prepare=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --prepare) prepare=1 ;;
    --out) out="$2"; shift ;;
    *) echo "gpu_check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

# Pure-Python packages ComfyUI imports that the GPU image lacks (it has torch, triton, numpy, safetensors,
# transformers, aiohttp, PIL, scipy, yaml, psutil, einops).
gpu_wheels=(torchsde==0.2.6 trampoline==0.1.2)

if [[ $prepare -eq 1 ]]; then
  comfy="${COMFYUI_PATH:-$repo/.loom/comfyui}"
  [[ -f "$comfy/main.py" ]] || { echo "gpu_check --prepare: no ComfyUI at $comfy (run make setup first)" >&2; exit 2; }
  rm -rf .gpu && mkdir -p .gpu/wheels
  # ComfyUI's code only: no tests, no models, no frontend (the check never starts the server).
  tar -C "$comfy/.." -chf - --exclude=tests --exclude=tests-unit --exclude=models --exclude=.git \
      --exclude='*.pyc' "$(basename "$(readlink -f "$comfy")")" | tar -C .gpu -xf -
  mv ".gpu/$(basename "$(readlink -f "$comfy")")" .gpu/comfyui
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .gpu/wheels "${gpu_wheels[@]}"
  du -sh .gpu
  echo "carry .gpu in the device run and start its command with: bash bench/gpu_check.sh --out \$OUT/gpu"
  exit 0
fi

mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
failed=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, record the outcome and the seconds it took
  local name="$1"; shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$summary"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   $name: exit $rc in $((SECONDS - start)) s" | tee -a "$summary"
  [[ $rc -eq 0 ]] || { failed=1; tail -n 20 "$out/$name.log" | sed 's/^/   | /' | tee -a "$summary"; }
}

py="${LOOM_PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .loom/venv/bin/python ]]; then py=.loom/venv/bin/python; else py=python3; fi
fi
comfy="${COMFYUI_PATH:-}"
if [[ -z "$comfy" ]]; then
  if [[ -d .gpu/comfyui ]]; then comfy=.gpu/comfyui; else comfy=.loom/comfyui; fi
fi
if [[ -d .gpu/wheels ]] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/loom-gpu-site .gpu/wheels/*.whl \
    && export PYTHONPATH="/tmp/loom-gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export COMFYUI_PATH="$comfy" PYTHONUNBUFFERED=1
loom=("$py" "$repo/__main__.py")

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" - <<'PY'
import importlib.util, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
if importlib.util.find_spec("triton"):
    import triton
    print("triton", triton.__version__)
else:
    print("triton: not installed")
PY
  "${loom[@]}" doctor 2>&1 | grep -v "^WARNING"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

methods=(base merged regional regional_noblend gates hooks composite dense_per_head)
if [[ $tiny -eq 1 ]]; then
  # CPU: the kernels run under Triton's interpreter (the tests arrange it), the perf sweep on the small model.
  step kernels "$py" -m pytest -q -p no:cacheprovider tests/unit/test_triton_kernels.py --junitxml="$out/kernels.xml"
  step perf-64 "${loom[@]}" bench perf --cpu --model small --resolutions 64 --adapters 2 --regions 2 \
       --steps 2 --repeats 1 --threads 2 --methods "${methods[@]}" --out "$out/perf-64" --force
  step dynamic "${loom[@]}" bench perf --cpu --model small --resolutions 64 --adapters 1 --regions 1 \
       --steps 2 --repeats 1 --threads 2 --methods base merged --patch-loras 0 --out "$out/dynamic" --force
else
  step kernels "$py" -m pytest -q -p no:cacheprovider tests/unit/test_triton_kernels.py --junitxml="$out/kernels.xml"
  for res in 512 1024; do  # the merged patch step (Loom vs core) once, with the 512² sweep
    patch=$([[ $res -eq 512 ]] && echo 1,4 || echo 0)
    step "perf-$res" "${loom[@]}" bench perf --model flux-dev --resolutions "$res" --adapters 1,4,16 --regions 1,4 \
         --steps 4 --repeats 2 --methods "${methods[@]}" --patch-loras "$patch" --out "$out/perf-$res" --force
  done
  dynamic="${LOOM_GPU_COMFYUI_DYNAMIC:-.gpu/comfyui-0.33}"
  if [[ -f "$dynamic/main.py" ]]; then
    COMFYUI_PATH="$dynamic" step dynamic "${loom[@]}" bench perf --comfyui "$dynamic" --model flux-dev \
         --resolutions 1024 --adapters 1,4 --regions 1 --steps 4 --repeats 2 --methods base merged --patch-loras 0 \
         --out "$out/dynamic" --force
  else
    echo "== dynamic: skipped (no ComfyUI 0.33 at $dynamic)" | tee -a "$summary"
  fi
fi
echo "gpu_check: $( [[ $failed -eq 0 ]] && echo 'all steps passed' || echo 'SOME STEPS FAILED' ); results in $out" \
  | tee -a "$summary"
exit $failed
