#!/usr/bin/env bash
# The GPU rates of docs/scale.md in one run, sized for about five minutes on one H100/H200:
#   1. SRD saliency on ResNet-50 and ViT-B/16 at 224 px, batch 64, against a plain input
#      gradient, Captum IG (50 steps) and the authors' per-image scheme (benchmarks/srd.py);
#   2. the batched latent iERF kernel against per-image and one-seed-at-a-time calls
#      (benchmarks/ierf_masks.py);
#   3. the cafe *stage* against that kernel, with and without the receptive-field crops
#      (benchmarks/cafe_stage.py, fastest of two alternating runs, forward batch 1024).
# Each writes its JSON under OUT, named by device. What it does not cover, and why: the Ray
# stages (extraction against a bare forward, SAE training against a minimal loop) need a Ray
# cluster with the GPU: `python benchmarks/pipeline.py` there; FAISS on the GPU needs the `gpu`
# extra (faiss-gpu-cu12 and CUDA 12's libraries).
#
#   benchmarks/gpu_rates.sh ATLAS [OUT]
#     ATLAS: an atlas with extraction, SAEs and the scan's exemplar picks (the CAFE benchmark's
#            atlas, docs/scale.md "Commands"); OUT: default benchmarks/results
#   DEVICE=cpu SMOKE=1 benchmarks/gpu_rates.sh ATLAS rates_smoke   # the same wiring in a minute
#   PYTHON=python3.12 ...                                         # another interpreter
set -euo pipefail

ATLAS=${1:?usage: benchmarks/gpu_rates.sh ATLAS [OUT]}
OUT=${2:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ ! -d "$ATLAS/exemplar_picks" ]; then
    echo "gpu_rates.sh: $ATLAS has no exemplar_picks/: build one with the scan stage" \
         "(docs/scale.md, Commands)" >&2
    exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_rates.sh: torch sees no CUDA device; DEVICE=cpu SMOKE=1 checks the wiring" >&2
    exit 2
fi
mkdir -p "$OUT"
# the device in the file names: h100, h200, cpu, ...
tag=$("$PY" -c "
import re, torch
name = torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else 'cpu'
print(next(iter(re.findall(r'[A-Z]\d{2,4}', name)), name.split()[-1]).lower())")

if [ -n "${SMOKE:-}" ]; then
    SRD=(--models resnet18 --batch 2 --size 64 --ig-batch 2 --ig-steps 4 --repeats 1 --no-memory)
    MASKS=(--images 2 --seeds 2)
    STAGE=(--images 4 --forward-batch 64)
else
    SRD=(--models resnet50 vit_base_patch16_224 --batch 64 --ig-batch 64)
    MASKS=(--images 64 --seeds 16 --image-batch 16)
    STAGE=(--images 256 --image-batch 16 --forward-batch 1024 --repeat 2)
fi

run() { echo; echo "== $*"; local t=$SECONDS; "$@"; echo "== $((SECONDS - t)) s"; }

run "$PY" "$HERE/benchmarks/srd.py" "${SRD[@]}" --device "$DEVICE" --out "$OUT/srd_$tag.json"
run "$PY" "$HERE/benchmarks/ierf_masks.py" --root "$ATLAS" "${MASKS[@]}" --device "$DEVICE" \
    --out "$OUT/ierf_masks_$tag.json"
for crop in field_crop no_crop; do
    flag=(); [ "$crop" = no_crop ] && flag=(--no-field-crop)
    run "$PY" "$HERE/benchmarks/cafe_stage.py" --root "$ATLAS" "${STAGE[@]}" "${flag[@]}" \
        --device "$DEVICE" --label "$crop" --out "$OUT/cafe_stage_$tag.json"
done
echo; echo "gpu_rates.sh: JSON in $OUT (*_$tag.json)"
