#!/usr/bin/env bash
# Command 1: set up, then the main job on the bundled sample catalogue (2,000 Fashion-MNIST products),
# on the embedded Qdrant engine, on the GPU if there is one and the CPU otherwise:
# fine-tune (quick settings) → export → sync → resync (nothing to do) → filtered queries → HTML report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export VISREC_ARTEFACT=${VISREC_ARTEFACT:-.visrec/demo/model}
export VISREC_QDRANT__PATH=${VISREC_QDRANT__PATH:-.visrec/demo/qdrant}
export VISREC_INGEST__FAILURE_REPORT=${VISREC_INGEST__FAILURE_REPORT:-.visrec/demo/failures.jsonl}
visrec=.venv/bin/visrec
catalogue=data/sample/catalogue.csv
# Quick settings for a CPU: 64 px inputs, 10 epochs on cached frozen features, 1 epoch of full fine-tuning.
$visrec train "$catalogue" --image-size 64 --epochs-frozen 10 --epochs-finetune 1
$visrec sync "$catalogue"
echo "# the same catalogue again: nothing changed, so nothing is embedded"
$visrec sync "$catalogue"
echo "# more like fmnist-00000 (an ankle boot), any category, then sandals only"
$visrec similar fmnist-00000 -k 5
$visrec similar fmnist-00000 -k 5 --category Sandal
$visrec report --out .visrec/demo/report.html --queries 6 -k 8
$visrec status
