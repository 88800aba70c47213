#!/usr/bin/env bash
# Build the GPU kit (docs/gpu.md): what the lent GPU machine lacks for scripts/gpu_run.sh, in an ignored
# folder that the device call carries. Run here, on the CPU, in the checkout the device call sends:
#   scripts/gpu_kit.sh                 # .gpukit/: wheels, packed weights (+ their check), Fashion-MNIST
#   scripts/gpu_kit.sh --tiny --no-wheels --out DIR    # a tiny kit for dry runs and tests (seconds)
# Options: --out DIR (.gpukit), --data DIR (Debian's Fashion-MNIST; fetched with apt-get download when
# absent), --bits N (10), --limit-mib N (60), --no-wheels, --no-check (skip the weights check), --tiny.
# It prints the kit's size with the working tree's and fails when the two exceed the limit.
set -euo pipefail
cd "$(dirname "$0")/.."

out=.gpukit data=/usr/share/datasets/fashion-mnist bits=10 limit=60 wheels=1 check=1 tiny=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift ;;
    --data) data=$2; shift ;;
    --bits) bits=$2; shift ;;
    --limit-mib) limit=$2; shift ;;
    --no-wheels) wheels=0 ;;
    --no-check) check=0 ;;
    --tiny) tiny=1 check=0 ;;
    *) echo "gpu_kit.sh: unknown option $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
kit() { "$PYTHON" benchmarks/gpu_kit.py "$@"; }

# Build beside the old kit and swap at the end: a failed build leaves the old kit whole.
build="$out.partial"
rm -rf "$build"
mkdir -p "$build/wheels" "$build/weights"
started=$SECONDS

if [ "$wheels" = 1 ]; then
  # The distributions the run imports that the GPU machine lacks (gpu_kit.KIT_DISTRIBUTIONS), each at its
  # constraints.txt pin: one version of each, cp312 manylinux x86-64 wheels, no dependencies resolved.
  names=$("$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks"); import gpu_kit; print(*gpu_kit.KIT_DISTRIBUTIONS)')
  pins=()
  for name in $names; do
    pattern=${name//[-_.]/[-_.]}
    pin=$(grep -i -E "^${pattern}==" constraints.txt | head -n 1 || true)
    [ -n "$pin" ] || { echo "gpu_kit.sh: $name has no pin in constraints.txt" >&2; exit 1; }
    pins+=("$pin")
  done
  echo "wheels: ${pins[*]}"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$build/wheels" "${pins[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  got=$(find "$build/wheels" -name '*.whl' | wc -l)
  [ "$got" -eq "${#pins[@]}" ] || { echo "gpu_kit.sh: $got wheels for ${#pins[@]} pins" >&2; exit 1; }
fi

if [ "$tiny" = 1 ]; then
  # Random weights, not compressed (seconds, not a minute); data from the bundled sample.
  kit pack-weights "$build/weights/imgsim-0.1.2-resnet50-q10.npz" --source random --bits "$bits" --preset -1
  kit tiny-data "$build/fashion-mnist"
else
  kit pack-weights "$build/weights/imgsim-0.1.2-resnet50-q10.npz" --bits "$bits"
  if [ "$check" = 1 ]; then
    # Embeddings of sample photos from the restored weights against the packaged originals (224 px).
    kit check-weights "$build/weights/imgsim-0.1.2-resnet50-q10.npz" --json "$build/weights/check.json"
  fi
  if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
    if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
      echo "gpu_kit.sh: no Fashion-MNIST at $data: apt-get install dataset-fashion-mnist, or --data DIR" >&2
      exit 1
    fi
    fetched=$(mktemp -d)
    trap 'rm -rf "$fetched"' EXIT
    echo "no Fashion-MNIST at $data: fetching Debian's dataset-fashion-mnist into $fetched"
    (cd "$fetched" && { apt-get download dataset-fashion-mnist 2>&1 | grep -v "unsandboxed" >&2; }) || true
    deb=$(find "$fetched" -name 'dataset-fashion-mnist_*.deb' | head -n 1)
    [ -n "$deb" ] || { echo "gpu_kit.sh: apt-get download dataset-fashion-mnist fetched nothing" >&2; exit 1; }
    dpkg -x "$deb" "$fetched/root"
    data="$fetched/root/usr/share/datasets/fashion-mnist"
  fi
  kit pack-data "$data" "$build/fashion-mnist"
fi

kit checksums "$build"
rm -rf "$out"
mv "$build" "$out"
echo "built $out in $((SECONDS - started)) s"
kit size "$out" --limit-mib "$limit"
