#!/usr/bin/env bash
# GPU figures on a lent GPU machine: (1) raw and (2) end-to-end throughput for ViT-B-32
# and ViT-L-14 at the measured best batch, with GPU memory and utilisation during (2). Prepare
# with bench/gpu_wheels.sh here, then run through the device tool:
#     command: bash bench/gpu_check.sh     carry: [".whl", ".gpu-photos"]     timeout_s: 590
# Results come back as $OUT/RESULTS-gpu-<model>.md.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 IMGEMBED_DATA_DIR=/tmp/imgembed
OUT="${OUT:-/tmp/imgembed-gpu}" && mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
bench() {  # seconds, name, then bench arguments
    timeout "$1" python3 -m imgembed bench --device cuda --photos .gpu-photos --out "$OUT/RESULTS-gpu-$2.md" "${@:3}" \
        2>&1 | grep -v -e ' INFO ' -e '^ ' | tail -20
}
bench 190 ViT-B-32 --model ViT-B-32 --figures 1,2
(export IMGEMBED_JPEG_DECODE=device; bench 100 ViT-B-32-nvjpeg --model ViT-B-32 --figures 2)
bench 230 ViT-L-14 --model ViT-L-14 --figures 1,2
