#!/usr/bin/env bash
# The one device call (docs/gpu.md): install the GPU kit (scripts/gpu_kit.sh), check everything first,
# then measure embedding throughput (benchmarks/embed_throughput.py, 224 px, four variants, batches
# 128-512) and run the paper's full recipe (benchmarks/quality.py) sized to the time left, stopping it
# cleanly at a deadline. Results go to $OUT (or --out) as each step finishes: gpu_run.log,
# environment.json, throughput.jsonl, throughput.md, quality.json, quality.md, summary.md.
#   bash scripts/gpu_run.sh                             # there: budget 480 s, kit .gpukit, results $OUT
#   scripts/gpu_run.sh --dry-run --out DIR              # here, on the CPU: tiny sizes and a tiny kit
# Options: --budget-s N (the whole run, from its start; 480), --kit DIR (.gpukit; a dry run builds a tiny
# one unless one is named), --out DIR ($OUT), --keep (a dry run keeps its work folder).
# A dry run uses this machine's Python (PYTHON, else .venv/bin/python) with `-S` and a site folder that
# links only the packages the GPU machine has or the kit carries: an import that would fail there fails
# here. It goes through every step; torch.compile is disabled in it (TORCHDYNAMO_DISABLE=1: compiling
# on the CPU takes minutes), the flag's plumbing is not.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
T0=$SECONDS

budget=480 kit="" dry=0 keep=0 results=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --budget-s) budget=$2; shift ;;
    --kit) kit=$2; shift ;;
    --out) results=$2; shift ;;
    --keep) keep=1 ;;
    *) echo "gpu_run.sh: unknown option $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$results" ] || { echo "gpu_run.sh: no results folder: set OUT or pass --out DIR" >&2; exit 2; }
mkdir -p "$results"
results=$(cd "$results" && pwd)

if [ "$dry" = 1 ]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/visrec-gpu-dry.XXXXXX")
  [ "$keep" = 1 ] || trap 'rm -rf "$work"' EXIT
  if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
  fi
  base=("$PYTHON")
  py=("$PYTHON" -S)
  device=cpu
else
  work=${TMPDIR:-/tmp}/visrec-gpu
  rm -rf "$work" && mkdir -p "$work"
  base=(python3)
  py=(python3)
  device=cuda
fi
[ "$dry" = 1 ] || kit=${kit:-.gpukit}
steps="$work/steps.tsv"
: >"$steps"
cores=$(nproc)
workers=$((cores > 16 ? 14 : (cores > 2 ? cores - 2 : 1)))  # loader workers: the main process needs a core

left() { echo $((budget - (SECONDS - T0))); }

# step NAME CMD...: run, log its time and status to steps.tsv (what summary.md lists); its status back.
step() {
  local name=$1 started=$SECONDS status
  shift
  echo "== $name: $(left) s of the ${budget} s budget left"
  "$@"
  status=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$([ "$status" = 0 ] && echo ok || echo "failed (exit $status)")" \
    "$((SECONDS - started))" "${note:-}" >>"$steps"
  note=""
  return "$status"
}
skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$steps"; echo "== $1: skipped: $2"; }
summary() {
  "${base[@]}" benchmarks/gpu_kit.py summary "$results" --steps "$steps" >"$results/summary.md" \
    || echo "gpu_run.sh: summary.md could not be written" >&2
}
stop() { echo "gpu_run.sh: $1"; summary; exit 1; }

main() {
  echo "gpu_run.sh: $(date -u +%FT%TZ), budget ${budget} s, results in $results, work in $work"
  if [ "$dry" = 1 ] && [ -z "$kit" ]; then
    kit="$work/kit"
    note="tiny kit: random weights, data from the bundled sample" \
      step "tiny kit" env PYTHON="$PYTHON" scripts/gpu_kit.sh --tiny --no-wheels --out "$kit" --limit-mib 1000 \
      || stop "could not build the tiny kit"
  fi
  [ -d "$kit" ] || stop "no kit at '${kit:-.gpukit}': build it with scripts/gpu_kit.sh and name .gpukit in carry"
  step checksums "${base[@]}" benchmarks/gpu_kit.py verify "$kit" || stop "the kit does not match its SHA256SUMS"

  if [ "$dry" = 1 ]; then
    step "emulated site" "${base[@]}" benchmarks/gpu_kit.py emulate-site "$work/site" || stop "no emulated site"
  else
    mkdir -p "$work/site"
    if compgen -G "$kit/wheels/*.whl" >/dev/null; then
      step "install wheels" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$work/site" "$kit"/wheels/*.whl || stop "pip could not install the kit's wheels"
    else
      skip "install wheels" "the kit has none"
    fi
  fi
  export PYTHONPATH="$work/site:$PWD"
  export PYTHONUNBUFFERED=1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader
  # The full run writes ~1.5 GiB of temp files; a dry run's tiny sizes about 0.2 GiB.
  min_free=2; [ "$dry" = 1 ] && min_free=0.5
  step preflight "${py[@]}" benchmarks/gpu_kit.py preflight --kit "$kit" --device "$device" \
    --min-free-gib "$min_free" --json "$results/environment.json" || stop "preflight failed: nothing was run (the lines above say why)"

  # The loader workers preflight chose (the cores less two, at most 14, as /dev/shm allows).
  workers=$("${base[@]}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["workers"])' \
    "$results/environment.json" 2>/dev/null || echo "$workers")
  weights="$work/imgsim-0.1.2-resnet50-q10.pth"
  step "restore weights" "${py[@]}" benchmarks/gpu_kit.py restore-weights \
    "$kit/weights/imgsim-0.1.2-resnet50-q10.npz" "$weights" || stop "the packed weights could not be restored"

  # (1) Embedding throughput: about a third of the budget; a variant that does not fit is skipped.
  if [ "$dry" = 1 ]; then
    sizes=(--count 16 --jpeg-size 48 --input-size 16 --batch-sizes 4 8 --workers 0)
  else
    sizes=(--count 4096 --jpeg-size 256 --input-size 224 --batch-sizes 128 256 512 --workers "$workers")
  fi
  throughput_end=$((SECONDS + budget * 35 / 100))
  decode_ok=$("${base[@]}" -c 'import json, sys; print(int(bool(json.load(open(sys.argv[1])).get("decode_on_device"))))' \
    "$results/environment.json" 2>/dev/null || echo 0)
  variants=("fp32|" "bf16, channels-last|--precision bf16 --channels-last"
    "bf16, channels-last, decode on device|--precision bf16 --channels-last --decode-on-device"
    "bf16, channels-last, compile|--precision bf16 --channels-last --compile")
  for variant in "${variants[@]}"; do
    name="throughput: ${variant%%|*}"
    read -r -a flags <<<"${variant#*|}"
    need=30
    [[ "$variant" == *--compile* ]] && need=100
    if [[ "$variant" == *--decode-on-device* ]] && [ "$decode_ok" != 1 ]; then
      skip "$name" "JPEG decoding on $device failed in preflight"
      continue
    fi
    if [ "$((throughput_end - SECONDS))" -lt "$need" ] && [ "$dry" = 0 ]; then
      skip "$name" "$((throughput_end - SECONDS)) s left of its share, ~${need} s needed"
      continue
    fi
    compile_off=()
    [ "$dry" = 1 ] && compile_off=(TORCHDYNAMO_DISABLE=1)
    step "$name" timeout -k 5 "$((throughput_end - SECONDS > 20 ? throughput_end - SECONDS : 20))" \
      env "${compile_off[@]}" "${py[@]}" benchmarks/embed_throughput.py "${sizes[@]}" --device "$device" \
      --no-sync --weights "$weights" --images-dir "$work" --results "$results/throughput.jsonl" "${flags[@]}"
    "${base[@]}" benchmarks/gpu_kit.py throughput-table "$results/throughput.jsonl" >"$results/throughput.md"
  done

  # (2) The paper's recipe: 224 px, 10 + 10 epochs, all 60,000 + 10,000 images, phase 2's images per epoch
  # sized from rates measured there, training stopped in time for evaluation and results (--deadline-s).
  deadline=$(($(left) - 30))
  if [ "$dry" = 1 ]; then
    recipe=(--device cpu --image-size 16 --epochs-frozen 1 --epochs-finetune 1 --batch-size 8 --workers 0
      --train-limit 40 --test-limit 20 --queries 10 --finetune-images 16)
  else
    recipe=(--device cuda --image-size 224 --epochs-frozen 10 --epochs-finetune 10 --batch-size 128
      --workers "$workers")
  fi
  if [ "$deadline" -lt 60 ]; then
    skip quality "only $(left) s left"
  else
    note="deadline ${deadline} s" step quality timeout -k 10 "$((deadline + 45))" \
      "${py[@]}" benchmarks/quality.py "${recipe[@]}" --data "$kit/fashion-mnist" --cache "$work/cache" \
      --out "$work/quality" --weights "$weights" --search exact --deadline-s "$deadline"
    cp "$work/quality/quality.json" "$work/quality/quality.md" "$results/" 2>/dev/null \
      || echo "gpu_run.sh: quality.py wrote no results"
  fi
  summary
  echo "gpu_run.sh: done in $((SECONDS - T0)) s; results: $(cd "$results" && echo *)"
}

main 2>&1 | tee -a "$results/gpu_run.log"
exit "${PIPESTATUS[0]}"
